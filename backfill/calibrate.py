"""calibrate: embed a small deterministic sample of the corpus with a version, as a partition would, and time it."""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from backfill.config import EmbedConfig, IndexConfig
from backfill.device import require_device
from backfill.embed import embed_shard
from backfill.errors import ConfigError
from backfill.manifest import list_shards, read_shard, write_shard
from backfill.pipeline import ThreadBudget
from backfill.plan import Plan, PlanInputs, PodSpec, Startup, plan_backfill, pod_rate
from backfill.registry import read_card
from backfill.runtime import load_model
from backfill.shard_summary import load_catalog
from backfill.storage import Layout, Store

SAMPLE_SHARDS = 8  # the sample is spread over at most this many shards, evenly through the sorted listing
WARMUP_ROWS = 32  # embedded first and not timed: the first batches pay for allocator and kernel warm-up


@dataclass(frozen=True)
class Calibration:
    """One version's measured partition throughput on this machine's device."""

    version: str
    dim: int
    device: str
    cpus: int  # the CPU budget the calibration ran with (affinity, cgroup limit)
    images: int
    rejects: int
    seconds: float  # embed_shard's wall time on the sample, after the warm-up
    img_s: float
    model_load_s: float
    batch_size: int
    stage_s: dict[str, float] = field(default_factory=dict)


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
    return table.take(_spread(table.num_rows, images))


def _spread(n: int, k: int) -> list[int]:
    """min(n, k) distinct indices of range(n), evenly spaced, the first and the last included."""
    k = min(n, k)
    return sorted({round(j * (n - 1) / max(1, k - 1)) for j in range(k)})


def calibrate(layout: Layout, model: str, version: str, config: EmbedConfig, images: int = 256) -> Calibration:
    """Embed a sample (a warm-up, then `images` rows) with embed_shard into a scratch root; nothing is kept."""
    card = read_card(layout, model, version)
    began = time.perf_counter()
    loaded = load_model(layout, card, config.device)
    model_load_s = time.perf_counter() - began
    sample = sample_rows(layout, images + WARMUP_ROWS)
    warm = _spread(sample.num_rows, min(WARMUP_ROWS, max(0, sample.num_rows - images)))
    timed = sorted(set(range(sample.num_rows)) - set(warm))
    cpus = ThreadBudget.resolve(config.torch_threads, config.decode_workers).cpus
    with tempfile.TemporaryDirectory(prefix="backfill-calibrate-") as scratch:
        tmp = Layout(Store.open(scratch))
        write_shard(tmp, "sample", sample.take(timed))
        run = replace(config, work_log=None, max_reject_rate=1.0)  # a bad sample image must not stop the clock
        if warm:
            write_shard(tmp, "warmup", sample.take(warm))
            embed_shard(tmp, "warmup", loaded, run)
        stats = embed_shard(tmp, "sample", loaded, run)
    return Calibration(
        version=version,
        dim=card.dim,
        device=config.device,
        cpus=cpus,
        images=stats.images,
        rejects=stats.rejects,
        seconds=stats.wall_s,
        img_s=stats.images_per_s,
        model_load_s=model_load_s,
        batch_size=stats.batch_size,
        stage_s={k: round(v, 3) for k, v in stats.stage_s.items()},
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
    rate = pod_rate(calibration.img_s, calibration.cpus, calibration.device, pod, pods)
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
        calibration = calibrate(layout, model, version, config, images)
    cpus = calibration.cpus if calibration else ThreadBudget.resolve().cpus
    pod = pod or local_pod(config.device, cpus, startup, calibration.model_load_s if calibration else None)
    if calibration is not None:
        return plan_for(layout, calibration, pod, pods, index, index_threads), calibration
    card = read_card(layout, model, version)
    inputs = PlanInputs(version, card.dim, tuple(shard_rows(layout).values()), img_s, pods, pod, index=index,
                        index_threads=index_threads)  # fmt: skip
    return plan_backfill(inputs), None


def calibration_rows(c: Calibration) -> list[tuple[str, str]]:
    """(what, value) lines of a calibration, for the CLI and the asset's markdown."""
    stages = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.stage_s.items(), key=lambda kv: -kv[1]))
    return [
        ("calibration", f"{c.images} sample images on {c.device} ({c.cpus} CPUs), batch {c.batch_size}: "
                        f"{c.img_s:,.1f} img/s, {c.seconds:.2f} s, {c.rejects} rejects"),
        ("calibration stages (s)", stages),
        ("model load", f"{c.model_load_s:.2f} s"),
    ]  # fmt: skip
