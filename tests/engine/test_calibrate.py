"""Calibration: a deterministic sample embedded by embed_shard in a scratch root, then the plan over the corpus."""

from backfill.calibrate import calibrate, local_pod, plan_for, sample_rows, shard_rows
from backfill.config import EmbedConfig, IndexConfig
from tests.conftest import MODEL


def test_the_sample_is_deterministic_and_spread_over_the_shards(layout):
    first, again = sample_rows(layout, 12), sample_rows(layout, 12)
    assert first.equals(again) and first.num_rows == 12
    ids = first.column("image_id").to_pylist()
    assert len(set(ids)) == 12 and min(ids) < 20 <= max(ids)  # not only the first shard's rows


def test_calibration_embeds_the_sample_and_leaves_the_root_untouched(registered):
    layout, card = registered
    calibration = calibrate(layout, MODEL, "v1", EmbedConfig(batch_size=8, chunk_size=8), images=24)
    assert calibration.images == 24 and calibration.rejects == 0 and calibration.dim == card.dim
    assert calibration.img_s > 0 and calibration.seconds > 0 and calibration.device == "cpu"
    assert {"wait_batch", "forward", "other"} <= set(calibration.stage_s)
    assert not layout.store.exists(layout.embeddings(MODEL, "v1"))  # nothing written to the real root

    assert shard_rows(layout) == {"shard-00000": 20, "shard-00001": 20, "shard-00002": 20}
    plan = plan_for(layout, calibration, local_pod("cpu", calibration.cpus), pods=2, index=IndexConfig())
    assert plan.images == 60 and plan.shards == 3 and plan.wall_s > 0 and plan.gpu_hours == 0
