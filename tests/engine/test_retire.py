"""Retiring old versions: what goes, what always stays, dry run, and that they never come back."""

import pytest

from backfill.cli import main
from backfill.config import EmbedConfig, IndexConfig
from backfill.discovery import discover
from backfill.embed import embed_shard
from backfill.errors import ConfigError
from backfill.incremental import build_or_update
from backfill.index import build_index
from backfill.manifest import list_shards
from backfill.publish import publish, read_pointer
from backfill.registry import list_versions
from backfill.runtime import load_model
from backfill.retire import plan_retirement, retire, retired_versions
from backfill.search import Searcher
from tests.conftest import MODEL, TINY, register_tiny


def version(layout, name, arch, shards=None):
    card = register_tiny(layout, name, arch)
    model = load_model(layout, card)
    shards = shards or list_shards(layout)
    for shard in shards:
        embed_shard(layout, shard, model, EmbedConfig(batch_size=16, chunk_size=16, torch_threads=1))
    return card


@pytest.fixture
def three_versions(layout):
    """v1 and v2 built, v2 serving (after two builds), v3 newer and still being embedded."""
    for name, arch in (("v1", TINY["v1"]), ("v2", TINY["v2"])):
        card = version(layout, name, arch)
        build = build_or_update(layout, MODEL, name, list_shards(layout), IndexConfig(), model_created=card.created).build
        publish(layout, MODEL, build.build_id)
    first_v2 = build.build_id
    again = build_index(layout, MODEL, "v2", list_shards(layout), IndexConfig(), model_created=card.created)  # e.g. a refresh
    publish(layout, MODEL, again.build_id)
    extra = build_index(layout, MODEL, "v2", list_shards(layout), IndexConfig(), model_created=card.created)  # built, not published
    version(layout, "v3", TINY["v1"], shards=list_shards(layout)[:1])
    return layout, {"v2_first": first_v2, "v2_serving": again.build_id, "v2_extra": extra.build_id}


def builds_of(layout, v):
    return [b for b in layout.store.ls(layout.index_builds(MODEL)) if b.startswith(f"{v}-")]


def test_plan_retires_only_older_versions_and_keeps_serving_previous_and_latest_builds(three_versions):
    layout, b = three_versions
    plan = plan_retirement(layout, MODEL, keep=0)
    assert (plan.serving, plan.retire, plan.keep) == ("v2", ["v1"], ["v2", "v3"])
    # v2_first is the build v2's serving build replaced: kept for a one-step rollback; v2_extra is v2's newest
    assert plan.builds == sorted(builds_of(layout, "v1"))
    assert plan_retirement(layout, MODEL, keep=1).retire == []
    with pytest.raises(ConfigError, match="keep must be in 0..1000"):
        plan_retirement(layout, MODEL, keep=-1)


def test_superseded_builds_of_a_kept_version_go(three_versions):
    layout, b = three_versions
    build_index(layout, MODEL, "v2", list_shards(layout), IndexConfig())  # now v2_extra is superseded too
    plan = plan_retirement(layout, MODEL, keep=1)
    assert plan.retire == [] and plan.builds == [b["v2_extra"]]


def test_retire_removes_data_marks_the_version_and_search_keeps_working(three_versions):
    layout, b = three_versions
    plan = plan_retirement(layout, MODEL, keep=0)
    retire(layout, plan)
    assert not layout.store.exists(layout.embeddings(MODEL, "v1")) and builds_of(layout, "v1") == []
    assert layout.store.exists(layout.embeddings(MODEL, "v2")) and layout.store.exists(layout.embeddings(MODEL, "v3"))
    assert {b["v2_first"], b["v2_serving"], b["v2_extra"]} <= set(builds_of(layout, "v2"))
    assert retired_versions(layout, MODEL) == ["v1"]
    assert Searcher(layout, MODEL).current().build_id == read_pointer(layout, MODEL)["build_id"] == b["v2_serving"]
    # the registry sensor never adds it back, and deletes its partition if Dagster still has it
    found = discover(layout, MODEL, known_versions={"v1", "v2", "v3"}, known_shards=set(list_shards(layout)))
    assert found.retired == ["v1"] and "v1" not in found.versions and found.new_versions == []
    fresh = discover(layout, MODEL, known_versions=set(), known_shards=set())
    assert fresh.new_versions == ["v2", "v3"] and fresh.retired == []
    assert plan_retirement(layout, MODEL, keep=0).retire == []  # nothing left to do: running it again is a no-op


def test_a_plan_is_refused_once_current_moved(three_versions):
    layout, b = three_versions
    plan = plan_retirement(layout, MODEL, keep=0)
    publish(layout, MODEL, b["v2_extra"])
    with pytest.raises(ConfigError, match="CURRENT moved"):
        retire(layout, plan)
    assert layout.store.exists(layout.embeddings(MODEL, "v1"))


def test_nothing_is_retired_before_anything_is_published(registered):
    layout, _ = registered
    plan = plan_retirement(layout, MODEL, keep=0)
    assert plan.retire == [] and "nothing is published yet" in plan.describe()


def test_cli_is_a_dry_run_unless_yes(three_versions, capsys):
    layout, _ = three_versions
    assert main(["--root", layout.store.root, "retire", "--keep", "0"]) == 0
    out = capsys.readouterr().out
    assert "retiring v1" in out and "dry run: nothing was removed" in out
    assert layout.store.exists(layout.embeddings(MODEL, "v1"))
    assert main(["--root", layout.store.root, "retire", "--keep", "0", "--yes"]) == 0
    assert "retired v1" in capsys.readouterr().out and not layout.store.exists(layout.embeddings(MODEL, "v1"))
    assert main(["--root", layout.store.root, "retire", "--keep", "-2"]) == 2
    assert "keep must be in 0..1000" in capsys.readouterr().err


def test_a_kept_version_keeps_its_newest_passing_build_when_its_newest_failed_the_gate(three_versions):
    layout, b = three_versions
    failing = IndexConfig(flat_below=10, pq_from=11, pq_m=2, target_recall=1.0, n_queries=20)
    card1 = next(c for c in list_versions(layout, MODEL)[0] if c.version == "v1")
    first_v1 = builds_of(layout, "v1")
    passing = build_index(layout, MODEL, "v1", list_shards(layout), IndexConfig(), model_created=card1.created)
    failed = build_index(layout, MODEL, "v1", list_shards(layout), failing, model_created=card1.created)
    assert passing.passed and not failed.passed
    plan = plan_retirement(layout, MODEL, keep=1)  # v1 is kept for rollback
    assert plan.retire == [] and "v1" in plan.keep
    assert passing.build_id not in plan.builds and failed.build_id not in plan.builds
    assert plan.builds == first_v1  # superseded by a passing build: that one goes
