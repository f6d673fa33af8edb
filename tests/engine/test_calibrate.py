"""Calibration: a deterministic sample embedded by embed_shard in a scratch root, then the plan over the corpus."""

import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from backfill import calibrate_slots
from backfill.calibrate import (
    Calibration,
    _combine,
    calibrate,
    calibration_rows,
    local_pod,
    plan_for,
    sample_rows,
    shard_rows,
)
from backfill.calibrate_slots import SlotResult, run_slots
from backfill.config import EmbedConfig, IndexConfig
from backfill.errors import ConfigError
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


def test_slots_side_by_side_are_fresh_processes_and_one_slots_rate(registered):
    layout, card = registered
    c = calibrate(layout, MODEL, "v1", EmbedConfig(batch_size=8, chunk_size=8), images=24, slots=2)
    assert c.slots == 2 and c.images == 24 and c.rejects == 0 and c.dim == card.dim
    assert c.img_s > 0 and c.seconds > 0 and c.model_load_s > 0 and c.warmup_s >= 0
    assert not layout.store.exists(layout.embeddings(MODEL, "v1"))
    assert "2 slots side by side" in dict(calibration_rows(c))["calibration"]
    # the slots themselves: two interpreters, neither this one, whose timed embeddings overlapped
    sample = sample_rows(layout, 16)
    parts = [(sample.slice(0, 4), sample.slice(4, 4)), (sample.slice(8, 4), sample.slice(12, 4))]
    a, b = run_slots(layout, card, EmbedConfig(batch_size=4, chunk_size=4), parts, "calibration", timeout_s=120)
    assert len({a.pid, b.pid, os.getpid()}) == 3
    assert max(a.start, b.start) < min(a.end, b.end)  # released together: side by side, not one after the other
    assert a.images == b.images == 4 and a.warm_rows == b.warm_rows == 4


# a stand-in slot: noise on its stdout, a word split across two writes, then the protocol (or a death after GO)
FAKE_SLOT = """
import json, os, sys, time
sys.stdout.write("a line of noise\\nbackfill-slot-lo"); sys.stdout.flush(); time.sleep(0.05)
sys.stdout.write("aded\\n"); sys.stdout.flush()
assert sys.stdin.readline().strip() == "go"
print("backfill-slot-ready", flush=True)
assert sys.stdin.readline().strip() == "go"
if DIE:
    sys.exit("out of luck after go")
print("backfill-slot-result", json.dumps(dict(model_load_s=0.5, warm_rows=0, warm_s=0.0, start=1.0, end=2.0,
      images=3, rejects=0, batch_size=4, pid=os.getpid())), flush=True)
"""


@pytest.mark.parametrize("die", [False, True])
def test_the_slots_protocol_skips_noise_joins_split_words_and_names_a_slot_that_dies(registered, monkeypatch, die):
    layout, card = registered
    sample = sample_rows(layout, 4)
    monkeypatch.setattr(calibrate_slots, "SLOT", f"DIE = {die}\n" + FAKE_SLOT)
    parts = [(sample.slice(0, 0), sample)] * 2
    if die:
        with pytest.raises(ConfigError, match=r"slot [01] exited with 1 before it had finished: out of luck"):
            run_slots(layout, card, EmbedConfig(), parts, "calibration", timeout_s=60)
    else:
        results = run_slots(layout, card, EmbedConfig(), parts, "calibration", timeout_s=60)
        assert [r.images for r in results] == [3, 3] and results[0].pid != results[1].pid


def test_a_corpus_smaller_than_the_sample_is_all_timed_with_no_warm_up(registered):
    layout, _ = registered  # 60 rows: none left over for the warm-up, one slot or two
    for slots in (1, 2):
        c = calibrate(layout, MODEL, "v1", EmbedConfig(batch_size=8, chunk_size=8), images=60, slots=slots)
        assert c.images == 60 and c.slots == slots and c.warmup_s == 0.0


def test_bad_slots_and_a_slot_that_dies_are_named(registered):
    layout, card = registered
    with pytest.raises(ConfigError, match=r"calibration of refcnn v1: slots must be at least 1 \(got 0\)"):
        calibrate(layout, MODEL, "v1", EmbedConfig(), images=8, slots=0)
    # the artifact swapped after registration: every slot refuses to load it, and the parent says why
    layout.store.write_bytes(f"{layout.model_dir(MODEL, 'v1')}/{card.artifact}", b"not the registered model")
    with pytest.raises(
        ConfigError, match=r"calibration of refcnn v1: slot \d exited with 1 before it had loaded the model: .*sha256"
    ):
        calibrate(layout, MODEL, "v1", EmbedConfig(batch_size=8), images=8, slots=2)


def test_slots_past_the_deadline_are_stopped_and_reaped(registered):
    layout, card = registered
    sample = sample_rows(layout, 8)
    parts = [(sample.slice(0, 0), sample)] * 2
    before = _children()  # earlier tests' leftovers in this worker are not this test's
    with pytest.raises(
        ConfigError,
        match=r"2 of 2 slots had not loaded the model after 0 s, and were stopped; .* --images",
    ):
        # 0.2 s: a fresh interpreter takes longer than that to import torch
        run_slots(layout, card, EmbedConfig(batch_size=8), parts, "calibration", timeout_s=0.2)
    assert set(_children()) - set(before) == set()  # killed and waited for: not even a zombie is left


def _children() -> list[int]:
    """This process's calibration slots still alive, and any child not waited for (a zombie), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone while we looked
            continue
        if int(ppid) == os.getpid() and (state == "Z" or b"backfill.calibrate_slots" in cmdline):
            kids.append(int(stat.parent.name))
    return kids


def test_combine_takes_one_slots_rate_over_the_common_span_and_the_warm_up_beyond_it():
    card = SimpleNamespace(version="v9", dim=8)  # _combine reads only these of the card
    slot = SlotResult(model_load_s=2.0, warm_rows=10, warm_s=6.0, start=100.0, end=109.0, images=100, rejects=1,
                      batch_size=10, stage_s={"forward": 8.0})  # fmt: skip
    results = [slot, replace(slot, start=101.0, end=110.0, model_load_s=4.0)]
    c = _combine(card, EmbedConfig(), results)
    assert c.slots == 2 and c.images == 200 and c.rejects == 2 and c.seconds == 10.0  # 100 .. 110
    assert c.img_s == 10.0  # 200 images / 2 slots / 10 s
    assert c.warmup_s == 5.0  # 6 s for 10 rows that take 1 s at 10 img/s
    assert c.model_load_s == 3.0 and c.stage_s == {"forward": 8.0}


def test_the_plan_takes_one_slots_rate_and_adds_the_warm_up_to_each_partition(layout):
    c = Calibration(version="v1", dim=16, device="cpu", cpus=2, images=200, rejects=0, seconds=10.0, img_s=10.0,
                    model_load_s=1.0, batch_size=8, slots=2, warmup_s=3.0)  # fmt: skip
    pod = local_pod("cpu", 2)
    plan = plan_for(layout, c, pod, pods=2, index=IndexConfig())
    assert plan.inputs.img_s_per_pod == 10.0  # 2 slots calibrated side by side, 2 planned: one slot's rate
    assert plan.inputs.pod.startup_s == pytest.approx(pod.startup_s + 3.0)
    assert "warm-up 3.0 s" in plan.inputs.pod.startup_source
    # 4 slots planned from 2 calibrated: the machine's whole rate (20 img/s) split four ways, warm-up slower too
    plan = plan_for(layout, c, pod, pods=4, index=IndexConfig())
    assert plan.inputs.img_s_per_pod == 5.0 and plan.inputs.pod.startup_s == pytest.approx(pod.startup_s + 6.0)


def test_shards_with_no_rows_are_refused_by_name(tmp_path):
    import pyarrow as pa

    from backfill.manifest import write_shard
    from backfill.storage import Layout, Store
    from tests.conftest import register_tiny

    layout = Layout(Store.open(str(tmp_path / "root")))
    write_shard(
        layout, "shard-00000", pa.table({"image_id": pa.array([], pa.int64()), "uri": pa.array([], pa.string())})
    )
    register_tiny(layout, "v1")
    with pytest.raises(ConfigError, match=r"calibration of refcnn v1: the manifest shards under .* have no rows"):
        calibrate(layout, MODEL, "v1", EmbedConfig(), images=8, slots=2)
