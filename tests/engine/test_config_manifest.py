import numpy as np
import pyarrow as pa
import pytest

from backfill.config import EmbedConfig, IndexConfig
from backfill.errors import ConfigError, ManifestError
from backfill.id_check import check_unique
from backfill.manifest import list_shards, read_shard, write_shard


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"batch_size": -1}, "batch_size"),  # 0 means: chosen per device
        ({"chunk_size": -1}, "chunk_size"),
        ({"device": "tpu"}, "device"),
        ({"max_reject_rate": 1.5}, "max_reject_rate"),
        ({"prefetch_batches": 0}, "prefetch_batches must be in 1..16, got 0"),
    ],
)
def test_embed_config_names_the_bad_setting(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        EmbedConfig(**kwargs)


def test_index_config_rejects_impossible_target():
    with pytest.raises(ConfigError, match="target_recall"):
        IndexConfig(target_recall=0)


def test_sample_corpus_manifests(layout):
    names = list_shards(layout)
    assert names == ["shard-00000", "shard-00001", "shard-00002"]
    shards = [read_shard(layout, n) for n in names]
    ids = np.concatenate([s.image_ids for s in shards])
    assert sorted(ids.tolist()) == list(range(60))
    check_unique(layout, names)  # no error


def test_duplicate_id_within_a_shard_is_refused(layout):
    write_shard(layout, "dup", pa.table({"image_id": pa.array([1, 2, 1], pa.int64()), "uri": ["a", "b", "c"]}))
    with pytest.raises(ManifestError, match=r"'dup' repeats image_id \[1\]"):
        read_shard(layout, "dup")


def test_duplicate_id_across_shards_names_both(layout):
    first = read_shard(layout, "shard-00000")
    write_shard(
        layout, "zz-extra", pa.table({"image_id": pa.array([int(first.image_ids[0])], pa.int64()), "uri": ["x"]})
    )
    with pytest.raises(ManifestError, match=r"in manifest shards 'shard-00000' and 'zz-extra'"):
        check_unique(layout, list_shards(layout))


def test_manifest_without_uri_column_says_what_is_needed(layout):
    with pytest.raises(ManifestError, match="has no 'uri' column"):
        write_shard(layout, "bad", pa.table({"image_id": pa.array([1], pa.int64())}))
    assert "bad" not in list_shards(layout)


def test_fetch_workers_never_exceed_the_s3_connection_pool():
    from backfill.storage import S3_CONNECTIONS, filesystem_options

    assert filesystem_options("s3")["config_kwargs"]["max_pool_connections"] == S3_CONNECTIONS
    assert EmbedConfig(fetch_workers=512).fetch_workers == 512  # the range it always allowed
    with pytest.raises(
        ConfigError,
        match=rf"fetch_workers must be in 1..{S3_CONNECTIONS} \(the S3 connection pool per process\), "
        rf"got {S3_CONNECTIONS + 1}",
    ):
        EmbedConfig(fetch_workers=S3_CONNECTIONS + 1)


def test_a_manifest_without_tar_columns_reads_as_before(layout):
    assert read_shard(layout, "shard-00000").members is None


def _tar_table(offsets, sizes, uris=None, offset_type=None):
    n = len(offsets)
    columns = {"image_id": pa.array(range(n), pa.int64()), "uri": uris or [f"/t/a.tar#{i}.jpg" for i in range(n)]}
    if offsets is not None:
        columns["tar_offset"] = pa.array(offsets, offset_type or pa.int64())
    if sizes is not None:
        columns["tar_size"] = pa.array(sizes, pa.int64())
    return pa.table(columns)


def test_tar_columns_read_as_member_ranges_with_plain_rows_at_minus_one(layout):
    write_shard(layout, "mixed", _tar_table([512, None], [10, None], uris=["/t/a.tar#0.jpg", "/t/p.jpg"]))
    members = read_shard(layout, "mixed").members
    assert members.offsets.tolist() == [512, -1] and members.sizes.tolist() == [10, -1]


@pytest.mark.parametrize(
    "table, words",
    [
        (_tar_table([512], None), "has 'tar_offset' but no 'tar_size': tar members need both columns"),
        (_tar_table([512.0], [10], offset_type=pa.float64()), "tar_offset must be an integer column, got double"),
        (_tar_table([512, None], [10, 10]), "tar_offset and tar_size must be null on the same rows"),
        (_tar_table([100], [10]), r"tar_offset must be a member's data offset \(>= 512"),
        (_tar_table([512], [-1]), "tar_size must be non-negative"),
        (_tar_table([512], [10], uris=["/t/a.jpg"]), "a row has tar_offset but its uri names no tar member"),
    ],
)
def test_bad_tar_columns_are_refused_naming_the_column_and_the_fix(layout, table, words):
    with pytest.raises(ManifestError, match=words):
        write_shard(layout, "bad-tar", table)
    assert "bad-tar" not in list_shards(layout)
