"""calibrate: embed a small deterministic sample of the corpus with a version, as a partition would, and time it."""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from backfill.calibrate_slots import SlotResult, embed_slot, run_slots
from backfill.config import EmbedConfig, IndexConfig
from backfill.device import require_device
from backfill.errors import ConfigError
from backfill.manifest import list_shards, read_shard
from backfill.pipeline import ThreadBudget
from backfill.plan import Plan, PlanInputs, PodSpec, Startup, plan_backfill, pod_rate
from backfill.registry import ModelCard, read_card
from backfill.shard_summary import load_catalog
from backfill.storage import Layout

SAMPLE_SHARDS = 8  # the sample is spread over at most this many shards, evenly through the sorted listing
WARMUP_ROWS = 32  # at least (and a whole batch): embedded first, timed apart; the first batch pays the warm-up
SLOTS_TIMEOUT_S = 600.0  # a calibration with several slots at once: the whole of it, load to last slot done
MAX_SLOTS = 8  # more run slots than this are planned from this many calibrated side by side


@dataclass(frozen=True)
class Calibration:
    """One version's measured partition throughput on this machine's device."""

    version: str
    dim: int
    device: str
    cpus: int  # the CPU budget the calibration ran with (affinity, cgroup limit)
    images: int
    rejects: int
    seconds: float  # the sample's embedding after the warm-up: from the first slot's start to the last one's end
    img_s: float
    model_load_s: float
    batch_size: int
    stage_s: dict[str, float] = field(default_factory=dict)
    slots: int = 1  # how many embedded side by side; img_s is one slot's rate among them
    warmup_s: float = 0.0  # per partition: the first batches' time beyond their rows at img_s


def shard_rows(layout: Layout) -> dict[str, int]:
    """Rows per manifest shard: from the discovery catalog where it has them, else each shard's Parquet footer."""
    known = load_catalog(layout).summaries
    rows = {}
    for shard in list_shards(layout):
        if shard in known:
            rows[shard] = known[shard].rows
        else:
            data = layout.store.read_bytes(layout.manifest(shard))
            rows[shard] = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    return rows


def sample_rows(layout: Layout, images: int) -> pa.Table:
    """image_id and uri of about `images` rows, evenly spaced in up to SAMPLE_SHARDS evenly spaced shards."""
    shards = list_shards(layout)
    if not shards:
        raise ConfigError(f"no manifest shards under {layout.store.display(layout.manifests)}: nothing to calibrate on")
    picked = [shards[i] for i in _spread(len(shards), SAMPLE_SHARDS)]
    per = max(1, -(-images // len(picked)))
    ids, uris = [], []
    for name in picked:
        shard = read_shard(layout, name)
        rows = _spread(len(shard), per)
        ids += shard.image_ids[rows].tolist()
        uris += [shard.uris[i] for i in rows]
    table = pa.table({"image_id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.string())})
    return _take(table, _spread(table.num_rows, images))


def _spread(n: int, k: int) -> list[int]:
    """min(n, k) distinct indices of range(n), evenly spaced, the first and the last included."""
    k = min(n, k)
    return sorted({round(j * (n - 1) / max(1, k - 1)) for j in range(k)})


def calibrate(
    layout: Layout, model: str, version: str, config: EmbedConfig, images: int = 256, slots: int = 1
) -> Calibration:
    """Embed a sample with embed_shard into a scratch root, as `slots` partitions at once; nothing is kept.

    Each slot loads the model, embeds its warm-up rows (the first batches' allocator and kernel warm-up, timed
    apart), then its share of the sample. slots 1 runs here; more run as that many fresh processes started
    together and released at once, as the local default's run slots share this machine: img_s is then one
    slot's rate while the others embed beside it, and the model load and warm-up are paid side by side too.
    """
    if slots < 1:
        raise ConfigError(f"calibration of {model} {version}: slots must be at least 1 (got {slots})")
    card = read_card(layout, model, version)
    warm_rows = max(WARMUP_ROWS, config.images_per_batch)  # a whole first batch, as a partition's
    sample = sample_rows(layout, images + slots * warm_rows)
    if sample.num_rows == 0:
        raise ConfigError(f"calibration of {model} {version}: the manifest shards under "
                          f"{layout.store.display(layout.manifests)} have no rows to sample")  # fmt: skip
    slots = min(slots, sample.num_rows)  # a corpus of fewer rows than slots: one row each
    shares = [_take(sample, range(j, sample.num_rows, slots)) for j in range(slots)]
    parts = []
    for share in shares:  # each slot's warm-up rows evenly through its share, the rest timed
        warm = _spread(share.num_rows, min(warm_rows, max(0, share.num_rows - max(1, images // slots))))
        parts.append((_take(share, warm), _take(share, sorted(set(range(share.num_rows)) - set(warm)))))
    if slots == 1:
        results = [embed_slot(layout, card, config, *parts[0])]
    else:
        results = run_slots(layout, card, config, parts, f"calibration of {model} {version}", SLOTS_TIMEOUT_S)
    return _combine(card, config, results)


def _take(table: pa.Table, rows) -> pa.Table:
    return table.take(pa.array(list(rows), pa.int64()))  # typed: an empty list has no type of its own


def _combine(card: ModelCard, config: EmbedConfig, results: list[SlotResult]) -> Calibration:
    """One slot's rate: every slot's images over the span from the first start to the last end, per slot."""
    images = sum(r.images for r in results)
    seconds = max(r.end for r in results) - min(r.start for r in results)
    img_s = images / len(results) / seconds if seconds > 0 else 0.0
    # the warm-up beyond what its rows cost at the steady rate: every partition pays it once
    excess = [max(0.0, r.warm_s - r.warm_rows / img_s) for r in results if r.warm_rows and img_s > 0]
    stage_s: dict[str, float] = {}
    for r in results:
        for k, v in r.stage_s.items():
            stage_s[k] = stage_s.get(k, 0.0) + v / len(results)
    return Calibration(
        version=card.version,
        dim=card.dim,
        device=config.device,
        cpus=ThreadBudget.resolve(config.torch_threads, config.decode_workers).cpus,
        images=images,
        rejects=sum(r.rejects for r in results),
        seconds=seconds,
        img_s=img_s,
        model_load_s=statistics.median(r.model_load_s for r in results),
        batch_size=results[0].batch_size,
        stage_s={k: round(v, 3) for k, v in stage_s.items()},
        slots=len(results),
        warmup_s=statistics.median(excess) if excess else 0.0,
    )


def local_pod(device: str, cpus: int, startup: Startup | None = None, model_load_s: float | None = None) -> PodSpec:
    """A run slot of the local default: every slot shares this machine; no pod start, no price.

    startup: measured here (ops.startup: earlier runs, this plan's own run, or a probe); else the bench's constants.
    model_load_s: the calibration's model load, added to a probe that timed the process starts alone (None: no
    calibration ran, so it is left out, and the source says so).
    """
    if startup is None:
        return PodSpec("local", device, cpus=cpus, shares_host=True)
    seconds, source = startup.seconds, startup.source
    if startup.add_model_load and model_load_s is None:
        source = f"{source}; the model's load not counted (no calibration)"
    elif startup.add_model_load:
        seconds, source = seconds + model_load_s, f"{source}, + the model's load {model_load_s:.1f} s"
    return PodSpec("local", device, cpus=cpus, shares_host=True, startup_s=seconds, startup_source=source)


def plan_for(
    layout: Layout, calibration: Calibration, pod: PodSpec, pods: int, index: IndexConfig, index_threads: int = 1
) -> Plan:
    """The plan of a calibrated version over the corpus's shards as they are now."""
    rows = shard_rows(layout)
    if not rows:
        raise ConfigError(f"no manifest shards under {layout.store.display(layout.manifests)}: nothing to plan")
    # the calibration's whole rate (its slots side by side), then one pod's share of it
    rate = pod_rate(calibration.img_s * calibration.slots, calibration.cpus, calibration.device, pod, pods)
    if calibration.warmup_s > 0:  # every partition's first batches, at this pod's rate
        warm = calibration.warmup_s * calibration.img_s / rate
        pod = replace(pod, startup_s=pod.startup_s + warm,
                      startup_source=f"{pod.startup_source}, + the first batches' warm-up {warm:.1f} s")  # fmt: skip
    inputs = PlanInputs(calibration.version, calibration.dim, tuple(rows.values()), rate, pods, pod,
                        index=index, index_threads=index_threads)  # fmt: skip
    return plan_backfill(inputs)


def plan_version(
    layout: Layout,
    model: str,
    version: str,
    config: EmbedConfig,
    index: IndexConfig,
    pod: PodSpec | None,
    pods: int,
    images: int = 256,
    img_s: float | None = None,
    index_threads: int = 1,
    startup: Startup | None = None,
) -> tuple[Plan, Calibration | None]:
    """Calibrate (unless img_s, one pod's rate, is given) and plan; pod None: the local default's run slots.

    index_threads: the FAISS threads of the step that builds the index (the index pool's CPUs);
    startup: the local default's start-up per partition as measured here (ops.startup.local_startup), if any.
    """
    calibration = None
    if img_s is None:
        fix = "run the plan where the pool's device is (a GPU machine for a cuda pool), or give a pod's rate (--img-s)"
        require_device(config.device, f"the plan of {model} {version} calibrates", fix)
        # the local default's run slots share this machine: calibrated side by side, as they will run
        slots = min(pods, MAX_SLOTS) if pod is None else 1
        calibration = calibrate(layout, model, version, config, images, slots)
    cpus = calibration.cpus if calibration else ThreadBudget.resolve().cpus
    pod = pod or local_pod(config.device, cpus, startup, calibration.model_load_s if calibration else None)
    if calibration is not None:
        return plan_for(layout, calibration, pod, pods, index, index_threads), calibration
    card = read_card(layout, model, version)
    inputs = PlanInputs(version, card.dim, tuple(shard_rows(layout).values()), img_s, pods, pod, index=index,
                        index_threads=index_threads)  # fmt: skip
    return plan_backfill(inputs), None


def calibration_summary(c: Calibration) -> dict:
    """What a saved plan keeps of its calibration (one slot's img/s, how many side by side, the warm-up)."""
    return {"calibrated_img_s": c.img_s, "calibration_slots": c.slots, "warmup_s": c.warmup_s}


def calibration_rows(c: Calibration) -> list[tuple[str, str]]:
    """(what, value) lines of a calibration, for the CLI and the asset's markdown."""
    side, per = (f", {c.slots} slots side by side", " per slot") if c.slots > 1 else ("", "")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.stage_s.items(), key=lambda kv: -kv[1]))
    return [
        ("calibration", f"{c.images} sample images on {c.device} ({c.cpus} CPUs), batch {c.batch_size}"
                        f"{side}: {c.img_s:,.1f} img/s{per}, {c.seconds:.2f} s, {c.rejects} rejects"),
        ("calibration stages (s)", stages),
        ("model load", f"{c.model_load_s:.2f} s" + (" (median slot)" if c.slots > 1 else "")),
        ("warm-up", f"{c.warmup_s:.2f} s per partition: the first batches beyond their rows' time"),
    ]  # fmt: skip
