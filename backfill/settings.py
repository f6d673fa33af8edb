"""The one reader of the environment: every variable the product reads, its parser and meaning, in one table."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backfill.config import EmbedConfig, IndexConfig
from backfill.errors import ConfigError

if TYPE_CHECKING:
    from backfill.discovery import DiscoveryBudget

REPO = Path(__file__).resolve().parents[1]  # the checkout: relative roots and the shipped pools file are under it
DEFAULT_ROOT = str(REPO / "data")
DEFAULT_POOLS_FILE = REPO / "deploy" / "pools.yaml"
DEFAULT_MODEL = "refcnn"  # the reference model name the demo, the tests and the Helm values use
DEPLOYMENTS = ("local", "local-in-process", "k8s")


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("is not an integer") from None


def _float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("is not a number") from None


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("is not a boolean (use true or false)")


def _text(raw: str) -> str:
    return raw.strip()


def _root(raw: str) -> str:
    # a relative folder is the repository's, whatever the process's working directory (the code
    # server, the run workers and the CLI must all find the same data)
    raw = raw.strip()
    if "://" in raw or os.path.isabs(raw):
        return raw
    return str((REPO / raw).resolve())


def _url(raw: str) -> str:
    if not raw.strip().startswith(("http://", "https://")):
        raise ValueError("is not a URL; expected e.g. https://minio.example.com:9000")
    return raw.strip()


def _deployment(raw: str) -> str:
    if raw.strip() not in DEPLOYMENTS:
        raise ValueError(f"must be one of {', '.join(DEPLOYMENTS)}")
    return raw.strip()


def _seconds(raw: str) -> int:
    value = _int(raw)
    if value < 1:
        raise ValueError("must be at least 1 second")
    return value


@dataclass(frozen=True)
class Variable:
    """One environment variable: which setting it fills ("embed.<field>", "index.<field>", "discovery.<field>" or a
    Settings field)."""

    name: str
    target: str
    parse: Callable[[str], Any]
    meaning: str


# Adding a setting is one entry here (its default stays on the dataclass field it fills).
VARIABLES: tuple[Variable, ...] = (
    Variable("BACKFILL_ROOT", "root", _root,
        "data root: a folder (relative: under the repository) or `s3://bucket/prefix`"),
    Variable("BACKFILL_MODEL", "model", _text, "the model name in the registry this deployment follows"),
    Variable("BACKFILL_S3_ENDPOINT_URL", "s3_endpoint_url", _url,
        "an S3-compatible endpoint (MinIO, SeaweedFS, Ceph, R2); unset for AWS S3"),
    Variable("BACKFILL_CACHE_DIR", "cache_dir", _text,
        "where the search service downloads (and verifies) index files from an object store"),
    Variable("BACKFILL_DEVICE", "embed.device", _text,
        "`cpu`, `cuda` or `cuda:N` (a GPU partition without CUDA fails, never falls back)"),
    Variable("BACKFILL_BATCH_SIZE", "embed.batch_size", _int, "images per forward pass (0: 256 on CUDA, 32 on a CPU)"),
    Variable("BACKFILL_CHUNK_SIZE", "embed.chunk_size", _int, "rows per committed chunk; fixed for a model version"),
    Variable("BACKFILL_FETCH_WORKERS", "embed.fetch_workers", _int,
        "image reads in flight per partition (at most the S3 pool, 512)"),
    Variable("BACKFILL_DECODE_WORKERS", "embed.decode_workers", _int,
        "decode threads (0: one per CPU of the pod's limit); with nvimgcodec, its host threads, split across "
        "assembly workers"),
    Variable("BACKFILL_TORCH_THREADS", "embed.torch_threads", _int,
        "torch intra-op threads (0: one per CPU of the pod's limit)"),
    Variable("BACKFILL_PREFETCH_BATCHES", "embed.prefetch_batches", _int,
        "prepared batches waiting for the model (1..16)"),
    Variable("BACKFILL_ASSEMBLY_WORKERS", "embed.assembly_workers", _int,
        "threads assembling batches, each on its own CUDA stream (1..16)"),
    Variable("BACKFILL_GPU_DECODE", "embed.gpu_decode", _bool, "on CUDA with torchvision: decode JPEGs with nvjpeg"),
    Variable("BACKFILL_GPU_DECODER", "embed.gpu_decoder", _text,
        "the GPU path's JPEG decoder: `torchvision` (nvjpeg through decode_jpeg) or `nvimgcodec` (nvImageCodec)"),
    Variable("BACKFILL_MAX_IMAGE_PIXELS", "embed.max_image_pixels", _int,
        "larger images are rejected (decompression bombs)"),
    Variable("BACKFILL_MAX_REJECT_RATE", "embed.max_reject_rate", _float,
        "a shard with a larger share of rejects fails"),
    Variable("BACKFILL_WARN_REJECT_RATE", "warn_reject_rate", _float, "the reject_rate check warns above this share"),
    Variable("BACKFILL_GRACE_S", "embed.grace_s", _float,
        "after SIGTERM, seconds a partition may take to commit the chunk in hand"),
    Variable("BACKFILL_TARGET_RECALL", "index.target_recall", _float,
        "recall@k gate for publishing; nprobe is tuned to reach it"),
    Variable("BACKFILL_RECALL_K", "index.k", _int, "k of the recall@k gate"),
    Variable("BACKFILL_RECALL_QUERIES", "index.n_queries", _int, "held-out queries the recall is measured on"),
    Variable("BACKFILL_INDEX_SEED", "index.seed", _int, "seed of the training sample and the queries"),
    Variable("BACKFILL_FLAT_BELOW", "index.flat_below", _int, "fewer vectors: an exact Flat index"),
    Variable("BACKFILL_PQ_FROM", "index.pq_from", _int, "this many vectors or more: SQ8 or PQ codes, never IVF-Flat"),
    Variable("BACKFILL_PQ_M", "index.pq_m", _int, "PQ sub-quantizers (0: dim / 4)"),
    Variable("BACKFILL_TRAIN_POINTS_PER_CENTROID", "index.train_points_per_centroid", _int,
        "training sample per IVF centroid (39..256)"),
    Variable("BACKFILL_TRAIN_ITERATIONS", "index.train_iterations", _int,
        "k-means iterations of the IVF quantizer (1..100; FAISS's default is 25)"),
    Variable("BACKFILL_INDEX_MEMORY_MB", "index.memory_budget_mb", _int,
        "peak memory of each index build step but merge and tune (MiB); it also picks the index type"),
    Variable("BACKFILL_MAX_NLIST", "index.max_nlist", _int,
        "most IVF lists (a power of two; training cost grows with it)"),
    Variable("BACKFILL_INDEX_ADD_PARALLELISM", "index.add_parallelism", _int,
        "faiss_index add steps per build (the shards split into this many groups; at most one per shard)"),
    Variable("BACKFILL_INDEX_MIN_GROUP_VECTORS", "index.min_group_vectors", _int,
        "fewest vectors per faiss_index add step (fewer add steps for a small version)"),
    Variable("BACKFILL_WORK_LOG", "embed.work_log", _text,
        "a file every attempt appends its embedded-batch sizes to (the chaos harness)"),
    Variable("BACKFILL_DISCOVERY_MAX_SHARDS", "discovery.max_shards", _int,
        "new manifests one registry tick reads; the rest wait for the next tick"),
    Variable("BACKFILL_DISCOVERY_MAX_SECONDS", "discovery.max_seconds", _float,
        "seconds of manifest reading per registry tick (Dagster stops a tick at 60 s)"),
    Variable("BACKFILL_DISCOVERY_MAX_OVERLAP_IDS", "discovery.max_overlap_ids", _int,
        "ids of known shards one tick reads to check overlapping id ranges; beyond it, checked before publishing"),
    Variable("BACKFILL_SENSOR_INTERVAL", "sensor_interval_s", _seconds, "seconds between registry sensor ticks"),
    Variable("BACKFILL_AUTOMATION_INTERVAL", "automation_interval_s", _seconds,
        "seconds between automation sensor ticks"),
    Variable("BACKFILL_REFRESH_CRON", "refresh_cron", _text, "cron of the refresh schedule (stopped by default)"),
    Variable("BACKFILL_DEPLOYMENT", "deployment", _deployment,
        "`local` (a process per step), `local-in-process` (steps in their run's process) or `k8s` (a Job per step)"),
    Variable("BACKFILL_POOLS_FILE", "pools_file", _text,
        "the pools file (in the cluster: the `backfill-pools` ConfigMap)"),
    Variable("BACKFILL_POOL", "pool", _text,
        "pool of the runs that sensors and the schedule launch (else the file's default)"),
    Variable("BACKFILL_SERVICE_TOKEN", "service_token", _text,
        "`backfill serve` asks every request but the probes for `Authorization: Bearer <this>`"),
)  # fmt: skip
BY_NAME = {v.name: v for v in VARIABLES}


def _budget_class() -> type[DiscoveryBudget]:
    # imported on use: backfill.discovery brings the engine (faiss, through backfill.retire), and
    # reading one setting (Store.open, the CLI's defaults) must stay as cheap as it was
    from backfill.discovery import DiscoveryBudget

    return DiscoveryBudget


def _budget() -> DiscoveryBudget:
    return _budget_class()()


@dataclass(frozen=True)
class Settings:
    """Everything a deployment configures, validated once; the engine parts are the engine's own dataclasses."""

    root: str = DEFAULT_ROOT
    model: str = DEFAULT_MODEL
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    discovery: DiscoveryBudget = field(default_factory=_budget)  # what one registry tick may read
    warn_reject_rate: float = 0.01
    s3_endpoint_url: str = ""  # empty: AWS S3 (botocore's own endpoint)
    cache_dir: str = ""  # empty: ~/.cache/backfill
    sensor_interval_s: int = 30
    automation_interval_s: int = 30
    refresh_cron: str = "0 3 * * 0"
    deployment: str = "local"
    pools_file: str = str(DEFAULT_POOLS_FILE)
    pool: str = ""  # empty: the pools file's default
    service_token: str = field(default="", repr=False)  # a secret: never in a repr or a log

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from the environment (or `env`); an empty variable counts as unset."""
        env = os.environ if env is None else env
        chosen = {v: parse(v, env[v.name]) for v in VARIABLES if env.get(v.name, "").strip()}
        top = {v.target: value for v, value in chosen.items() if "." not in v.target}
        embed = _section(EmbedConfig, "embed", chosen)
        index = _section(IndexConfig, "index", chosen)
        discovery = _section(_budget_class(), "discovery", chosen)
        return cls(embed=embed, index=index, discovery=discovery, **top)


def parse(variable: Variable, raw: str) -> Any:
    """One variable's value; a bad one is a ConfigError naming the variable and the fix."""
    try:
        return variable.parse(raw)
    except ValueError as exc:
        raise ConfigError(
            f"environment variable {variable.name}={raw!r} {exc}: set a valid value or unset it "
            f"(default {default(variable)!r}: {variable.meaning})"
        ) from None


def _section(config: type, prefix: str, chosen: Mapping[Variable, Any]) -> Any:
    """An EmbedConfig, IndexConfig or DiscoveryBudget from the chosen variables; a refused value names its variable."""
    values = {v.target.split(".", 1)[1]: (v, value) for v, value in chosen.items() if v.target.startswith(prefix + ".")}
    try:
        return config(**{name: value for name, (_, value) in values.items()})
    except ConfigError as exc:
        # the dataclass names the fields it refuses ("pq_from must be greater than flat_below")
        named = [pair for name, pair in values.items() if re.search(rf"\b{name}\b", str(exc))] or list(values.values())
        given = ", ".join(f"{v.name}={value!r}" for v, value in named)
        raise ConfigError(f"environment variable {given}: {exc} (set a valid value or unset it)") from None


def default(variable: Variable) -> Any:
    """The default a variable overrides: the dataclass field it fills."""
    owner, _, name = variable.target.rpartition(".")
    if owner == "":  # the field's own default: building Settings() would build every section
        return next(f.default for f in fields(Settings) if f.name == name)
    holder = {"embed": EmbedConfig, "index": IndexConfig, "discovery": _budget_class()}[owner]()
    return getattr(holder, name)


def setting(name: str, env: Mapping[str, str] | None = None) -> Any:
    """One variable's value (or its default), for code that needs one setting and must not fail on another
    (the filesystem options of every Store.open, the search service's cache)."""
    variable = BY_NAME[name]
    raw = (os.environ if env is None else env).get(name, "")
    return parse(variable, raw) if raw.strip() else default(variable)
