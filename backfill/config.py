"""Frozen, validated settings for the engine: every knob is checked once, here."""

from __future__ import annotations

from dataclasses import dataclass

from backfill.errors import ConfigError
from backfill.storage import S3_CONNECTIONS

GPU_DECODERS = ("torchvision", "nvimgcodec")  # feed.Preprocessor's JPEG decoders on CUDA


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class EmbedConfig:
    """How one shard is embedded.

    chunk_size is part of the on-storage contract: chunk i covers rows
    [i*chunk_size, (i+1)*chunk_size) of the shard, so it must not change while a
    model version is being embedded (a resume with another size is refused).
    """

    batch_size: int = 64  # 0: chosen per device (see images_per_batch)
    chunk_size: int = 256
    device: str = "cpu"
    fetch_workers: int = 64  # requests in flight: object-store GETs wait on latency, not CPU
    decode_workers: int = 0  # 0: one per CPU the process may use
    torch_threads: int = 0  # 0: one per CPU the process may use
    max_reject_rate: float = 0.05
    max_image_pixels: int = 64_000_000
    grace_s: float = 20.0  # after a preemption notice: time to finish and commit the chunk in hand
    gpu_decode: bool = True  # on CUDA with torchvision installed: JPEGs decoded by nvjpeg (PIL for the rest)
    gpu_decoder: str = "torchvision"  # the GPU path's JPEG decoder: torchvision's decode_jpeg, or nvimgcodec
    prefetch_batches: int = 3  # prepared batches waiting for the model (each ~N x 150 KB of device memory)
    # threads assembling batches (on CUDA: nvjpeg, resize, the copy), each on its own CUDA stream; order is kept.
    # Up to 2 x this many batches are in assembly at once, on the device, besides the prefetched ones
    assembly_workers: int = 1
    work_log: str | None = None  # a file each attempt appends a line to per embedded batch (hooks.WorkLog)

    def __post_init__(self) -> None:
        _require(
            0 <= self.batch_size <= 8192, f"batch_size must be in 1..8192 (or 0: per device), got {self.batch_size}"
        )
        _require(1 <= self.chunk_size <= 1_000_000, f"chunk_size must be in 1..1000000, got {self.chunk_size}")
        _require(
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:"),
            f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        # more requests in flight than the S3 connection pool holds would queue for a connection
        _require(
            1 <= self.fetch_workers <= S3_CONNECTIONS,
            f"fetch_workers must be in 1..{S3_CONNECTIONS} (the S3 connection pool per process), "
            f"got {self.fetch_workers}",
        )
        _require(self.decode_workers >= 0, f"decode_workers must be >= 0, got {self.decode_workers}")
        _require(self.torch_threads >= 0, f"torch_threads must be >= 0, got {self.torch_threads}")
        _require(
            0.0 <= self.max_reject_rate <= 1.0,
            f"max_reject_rate must be a fraction in [0, 1], got {self.max_reject_rate}",
        )
        _require(self.max_image_pixels >= 1, f"max_image_pixels must be positive, got {self.max_image_pixels}")
        _require(1 <= self.prefetch_batches <= 16, f"prefetch_batches must be in 1..16, got {self.prefetch_batches}")
        _require(
            self.gpu_decoder in GPU_DECODERS,
            f"gpu_decoder must be one of {', '.join(GPU_DECODERS)}, got {self.gpu_decoder!r}",
        )
        _require(1 <= self.assembly_workers <= 16, f"assembly_workers must be in 1..16, got {self.assembly_workers}")
        _require(0 <= self.grace_s <= 3600, f"grace_s must be in 0..3600 seconds, got {self.grace_s}")

    @property
    def images_per_batch(self) -> int:
        """batch_size, or for 0 the device's default: 256 on CUDA (keeps an H100 busy with a
        ResNet-50 and amortises nvjpeg's batched call), 32 on a CPU (bf16 throughput is flat
        above it and smaller batches keep the preemption grace short)."""
        if self.batch_size:
            return self.batch_size
        return 256 if self.device.startswith("cuda") else 32


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built and judged.

    The index type follows from N and memory_budget_mb by one rule: backfill/index_plan.py plan_index
    (Flat below flat_below; then IVF with full vectors below pq_from, SQ8 or PQ, whichever is the most
    accurate that fits the budget). memory_budget_mb bounds every build step's peak memory except the
    steps that hold the filled index; max_nlist caps the IVF lists (training cost grows with it).
    """

    target_recall: float = 0.95
    k: int = 10
    n_queries: int = 200
    seed: int = 1234
    flat_below: int = 1_000
    pq_from: int = 5_000_000
    pq_m: int = 0  # 0: dim // 4 sub-quantizers
    train_points_per_centroid: int = 64
    # k-means iterations of the IVF quantizer (FAISS's default is 25; 10 gives the same recall@10 at 1M, in 40%
    # of the training time: docs/index.md)
    train_iterations: int = 10
    memory_budget_mb: int = 4096
    max_nlist: int = 65536
    add_parallelism: int = 4  # faiss_index's add steps: the shards split into at most this many groups
    # ...of at least this many vectors each: an add step is a pod start (~30 s), and adding 500,000 vectors to an
    # IVF4096 index takes about as long on one core (docs/index.md), so smaller groups cost more than they save
    min_group_vectors: int = 500_000

    def __post_init__(self) -> None:
        _require(0.0 < self.target_recall <= 1.0, f"target_recall must be in (0, 1], got {self.target_recall}")
        _require(1 <= self.k <= 1000, f"k must be in 1..1000, got {self.k}")
        _require(self.n_queries >= 1, f"n_queries must be positive, got {self.n_queries}")
        _require(self.flat_below >= 1, f"flat_below must be positive, got {self.flat_below}")
        _require(self.pq_from > self.flat_below, "pq_from must be greater than flat_below")
        _require(
            39 <= self.train_points_per_centroid <= 256,
            f"train_points_per_centroid must be in 39..256, got {self.train_points_per_centroid}",
        )
        _require(1 <= self.train_iterations <= 100, f"train_iterations must be in 1..100, got {self.train_iterations}")
        _require(
            self.memory_budget_mb >= 1,
            f"memory_budget_mb must be a positive number of MiB, got {self.memory_budget_mb}",
        )
        _require(
            self.max_nlist >= 1 and self.max_nlist & (self.max_nlist - 1) == 0,
            f"max_nlist must be a power of two, got {self.max_nlist}",
        )
        _require(
            self.add_parallelism >= 1, f"add_parallelism must be a positive number of steps, got {self.add_parallelism}"
        )
        _require(
            self.min_group_vectors >= 1,
            f"min_group_vectors must be a positive number of vectors, got {self.min_group_vectors}",
        )
