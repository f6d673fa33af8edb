"""The one Dagster resource that carries engine settings; each is validated by the engine's dataclasses."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from dagster import ConfigurableResource, Failure

from backfill.config import EmbedConfig, IndexConfig
from backfill.errors import PermanentError
from backfill.pipeline import ThreadBudget
from backfill.registry import read_card
from backfill.settings import Settings
from backfill.storage import Layout, Store

if TYPE_CHECKING:  # torch: imported by the steps that load a model, never by the definitions (sensors, run workers)
    from backfill.runtime import LoadedModel

_SETTINGS, _EMBED, _INDEX = Settings(), EmbedConfig(), IndexConfig()


class BackfillResource(ConfigurableResource):
    """Where the data lives and how partitions are embedded and indexed.

    One field per EmbedConfig and IndexConfig field, of the same name and default (a test holds
    them equal), so each can be set in the launchpad; from_settings fills them from the environment.
    """

    root: str
    model: str = _SETTINGS.model
    warn_reject_rate: float = _SETTINGS.warn_reject_rate
    # EmbedConfig
    device: str = _EMBED.device
    batch_size: int = _EMBED.batch_size
    chunk_size: int = _EMBED.chunk_size
    fetch_workers: int = _EMBED.fetch_workers
    decode_workers: int = _EMBED.decode_workers
    torch_threads: int = _EMBED.torch_threads
    max_reject_rate: float = _EMBED.max_reject_rate
    max_image_pixels: int = _EMBED.max_image_pixels
    grace_s: float = _EMBED.grace_s
    gpu_decode: bool = _EMBED.gpu_decode
    gpu_decoder: str = _EMBED.gpu_decoder
    prefetch_batches: int = _EMBED.prefetch_batches
    assembly_workers: int = _EMBED.assembly_workers
    work_log: str | None = _EMBED.work_log  # a file every attempt appends "<pid> <version> <shard> <n>" to
    # IndexConfig
    target_recall: float = _INDEX.target_recall
    k: int = _INDEX.k  # of recall@k
    n_queries: int = _INDEX.n_queries
    seed: int = _INDEX.seed
    flat_below: int = _INDEX.flat_below
    pq_from: int = _INDEX.pq_from
    pq_m: int = _INDEX.pq_m
    train_points_per_centroid: int = _INDEX.train_points_per_centroid
    train_iterations: int = _INDEX.train_iterations
    memory_budget_mb: int = _INDEX.memory_budget_mb
    max_nlist: int = _INDEX.max_nlist
    add_parallelism: int = _INDEX.add_parallelism
    min_group_vectors: int = _INDEX.min_group_vectors

    @classmethod
    def from_settings(cls, settings: Settings) -> BackfillResource:
        return cls(
            root=settings.root,
            model=settings.model,
            warn_reject_rate=settings.warn_reject_rate,
            **dataclasses.asdict(settings.embed),
            **dataclasses.asdict(settings.index),
        )

    def setup_for_execution(self, context) -> None:
        # once per step process (a pod in the cluster): torch and FAISS threads follow its CPU limit
        ThreadBudget.resolve().apply()

    def layout(self) -> Layout:
        return Layout(Store.open(self.root))

    def embed_config(self, device: str | None = None) -> EmbedConfig:
        return EmbedConfig(**{**_values(self, EmbedConfig), "device": device or self.device})

    def index_config(self) -> IndexConfig:
        return IndexConfig(**_values(self, IndexConfig))

    def load_model(self, version: str, device: str | None = None) -> LoadedModel:
        return _cached_model(self.root, self.model, version, device or self.device)


def _values(resource: BackfillResource, config: type) -> dict:
    return {f.name: getattr(resource, f.name) for f in dataclasses.fields(config)}


@functools.lru_cache(maxsize=2)
def _cached_model(root: str, model: str, version: str, device: str) -> LoadedModel:
    # built once per process (a pod), reused by every partition it runs
    from backfill.runtime import load_model

    layout = Layout(Store.open(root))
    return load_model(layout, read_card(layout, model, version), device)


def run_engine(context, fn, *args, **kwargs):
    """Call an engine function; a permanent error fails the step and its run for good, others retry."""
    try:
        return fn(*args, **kwargs)
    except PermanentError as exc:
        # no step retry, and no run retry either: the instance retries failed runs (for
        # interrupted steps and lost workers), which would only repeat this failure
        context.instance.add_run_tags(context.run.run_id, {"dagster/retry_on_asset_or_op_failure": "false"})
        raise Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc
