"""Discovery at O(new): summaries recorded once, overlap checks only where id ranges meet, budgets per call."""

import numpy as np
import pyarrow as pa
import pytest

from backfill.discovery import DiscoveryBudget, discover
from backfill.errors import ConfigError, ManifestError
from backfill.id_check import check_unique, overlapping_groups
from backfill.manifest import list_shards, write_shard
from backfill.shard_summary import ShardSummary, load_catalog
from backfill.storage import Store
from tests.conftest import MODEL


def write_ids(layout, name: str, ids) -> None:
    ids = [int(i) for i in ids]
    write_shard(layout, name, pa.table({"image_id": pa.array(ids, pa.int64()), "uri": [f"{i}.jpg" for i in ids]}))


@pytest.fixture
def reads(monkeypatch):
    """Every path read through a Store, in order."""
    seen: list[str] = []
    original = Store.read_bytes
    monkeypatch.setattr(Store, "read_bytes", lambda self, path: seen.append(path) or original(self, path))
    return seen


def accept_all(layout) -> set[str]:
    found = discover(layout, MODEL, known_versions=set(), known_shards=set())
    assert not found.pending and not found.skipped
    return set(found.new_shards)


def test_a_new_shard_overlapping_one_known_range_reads_that_sidecar_only(layout, reads):
    for i in range(10):
        write_ids(layout, f"r-{i:02d}", range(1_000 * (i + 1), 1_000 * (i + 1) + 100))
    known = accept_all(layout)
    write_ids(layout, "r-99", [4_999, 5_500])  # spans r-04's range, sharing no id
    reads.clear()
    found = discover(layout, MODEL, known_versions=set(), known_shards=known)
    assert found.new_shards == ["r-99"]
    assert [p.rsplit("/", 1)[-1] for p in reads if p.endswith((".parquet", ".npy"))] == [
        "catalog.parquet",
        "r-99.parquet",
        "r-04.npy",
    ]


def test_a_new_shard_repeating_a_known_id_is_refused_and_not_read_again(layout, reads):
    known = accept_all(layout)
    write_ids(layout, "late", [7])
    found = discover(layout, MODEL, known_versions=set(), known_shards=known)
    assert found.new_shards == [] and "image_id 7 appears in manifest shards" in found.skipped["shard late"]
    reads.clear()
    again = discover(layout, MODEL, known_versions=set(), known_shards=known)
    assert again.skipped == found.skipped
    assert layout.manifest("late") not in reads


def test_new_shards_colliding_with_each_other_keep_the_first_by_name(layout):
    known = accept_all(layout)
    write_ids(layout, "a-new", [500, 501])
    write_ids(layout, "b-new", [501, 502])
    found = discover(layout, MODEL, known_versions=set(), known_shards=known)
    assert found.new_shards == ["a-new"]
    assert found.skipped == {
        "shard b-new": "image_id 501 appears in manifest shards 'a-new' and 'b-new': every image_id must be in exactly one shard"
    }


def test_an_invalid_manifest_is_skipped_with_its_reason(layout):
    write_shard(layout, "dup", pa.table({"image_id": pa.array([1_000, 1_000], pa.int64()), "uri": ["a", "b"]}))
    found = discover(layout, MODEL, known_versions=set(), known_shards=set())
    assert "repeats image_id [1000]" in found.skipped["shard dup"]
    assert "dup" not in found.shards and len(found.new_shards) == 3


def test_the_time_budget_leaves_the_rest_for_the_next_call(layout):
    ticks = iter(range(100))
    found = discover(layout, MODEL, set(), set(), DiscoveryBudget(max_seconds=2.5), clock=lambda: next(ticks))
    assert found.new_shards == ["shard-00000", "shard-00001"] and found.pending == 1
    rest = discover(layout, MODEL, set(), set(found.new_shards))
    assert rest.new_shards == ["shard-00002"] and rest.pending == 0


def test_known_shards_without_a_summary_are_summarised_before_new_ones_are_read(layout):
    # a deployment whose shards were added before the catalog existed
    write_ids(layout, "zz-new", [0])  # repeats a known id: must be refused, so the known ones go first
    known = {"shard-00000", "shard-00001", "shard-00002"}
    first = discover(layout, MODEL, set(), known, DiscoveryBudget(max_shards=2))
    assert first.new_shards == [] and first.pending == 2
    second = discover(layout, MODEL, set(), known, DiscoveryBudget(max_shards=2))
    assert second.new_shards == [] and "image_id 0 appears" in second.skipped["shard zz-new"]
    assert set(load_catalog(layout).summaries) == known


def test_an_overlap_larger_than_one_call_may_read_is_left_to_the_pre_publish_check(layout):
    known = accept_all(layout)
    write_ids(layout, "wide", [1_000, 1_001, 2])  # repeats id 2, but the range overlaps 60 known ids
    found = discover(layout, MODEL, set(), known, DiscoveryBudget(max_overlap_ids=10))
    assert found.new_shards == ["wide"] and found.unverified == ["wide"]
    with pytest.raises(ManifestError, match="image_id 2 appears in manifest shards 'shard-000.*' and 'wide'"):
        check_unique(layout, sorted(known | {"wide"}))


def test_a_new_version_waits_while_shards_are_pending(registered):
    layout, _ = registered
    found = discover(layout, MODEL, set(), set(), DiscoveryBudget(max_shards=1))
    assert found.new_versions == [] and found.held_versions == ["v1"] and found.pending == 2


def test_the_budget_must_be_positive():
    with pytest.raises(ConfigError, match="DiscoveryBudget.max_shards must be positive, got 0"):
        DiscoveryBudget(max_shards=0)


def test_overlapping_groups_chain_ranges():
    s = [
        ShardSummary("a", 2, 0, 10),
        ShardSummary("b", 2, 20, 30),
        ShardSummary("c", 2, 5, 21),
        ShardSummary("d", 2, 40, 50),
    ]
    assert [[x.name for x in g] for g in overlapping_groups(s)] == [["a", "c", "b"], ["d"]]


def test_range_partitioned_shards_are_checked_from_the_catalog_alone(layout, reads):
    for i in range(5):
        write_ids(layout, f"p-{i}", range(1_000 * (i + 1), 1_000 * (i + 1) + 10))
    accept_all(layout)
    reads.clear()
    check_unique(layout, [n for n in list_shards(layout) if n.startswith("p-")])
    assert [p.rsplit("/", 1)[-1] for p in reads] == ["catalog.parquet"]


@pytest.mark.parametrize("max_ids", [10**9, 1_000])  # in memory, and spilled to hash buckets on disk
def test_the_pre_publish_check_finds_a_duplicate_among_interleaved_shards(layout, max_ids):
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(100, 20_100))
    for i in range(8):
        write_ids(layout, f"x-{i}", ids[i::8])  # every range overlaps every other
    names = [f"x-{i}" for i in range(8)]
    check_unique(layout, names, max_ids_in_memory=max_ids)  # unique: no error
    write_ids(layout, "x-dup", [int(ids[12_345]), 50_000])
    with pytest.raises(
        ManifestError, match=f"image_id {int(ids[12_345])} appears in manifest shards 'x-1' and 'x-dup'"
    ):
        check_unique(layout, names + ["x-dup"], max_ids_in_memory=max_ids)
