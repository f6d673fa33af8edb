"""The one Dagster resource that carries engine settings; each is validated by the engine's dataclasses."""

from __future__ import annotations

import functools

from dagster import ConfigurableResource, Failure

from backfill.config import EmbedConfig, IndexConfig
from backfill.errors import PermanentError
from backfill.pipeline import ThreadBudget
from backfill.registry import read_card
from backfill.runtime import LoadedModel, load_model
from backfill.storage import Layout, Store


class BackfillResource(ConfigurableResource):
    """Where the data lives and how partitions are embedded and indexed."""

    root: str
    model: str = "refcnn"
    device: str = "cpu"
    batch_size: int = 64
    chunk_size: int = 256
    max_reject_rate: float = 0.05
    warn_reject_rate: float = 0.01
    target_recall: float = 0.95
    grace_s: float = 20.0
    work_log: str = ""  # if set, a file that every attempt appends "<pid> <version> <shard> <n>" to per embedded batch


    def setup_for_execution(self, context) -> None:
        # once per step process (a pod in the cluster): torch and FAISS threads follow its CPU limit
        ThreadBudget.resolve().apply()

    def layout(self) -> Layout:
        return Layout(Store.open(self.root))

    def embed_config(self, device: str | None = None) -> EmbedConfig:
        return EmbedConfig(
            batch_size=self.batch_size,
            chunk_size=self.chunk_size,
            device=device or self.device,
            max_reject_rate=self.max_reject_rate,
            grace_s=self.grace_s,
        )

    def index_config(self) -> IndexConfig:
        return IndexConfig(target_recall=self.target_recall)

    def load_model(self, version: str, device: str | None = None) -> LoadedModel:
        return _cached_model(self.root, self.model, version, device or self.device)


@functools.lru_cache(maxsize=2)
def _cached_model(root: str, model: str, version: str, device: str) -> LoadedModel:
    # built once per process (a pod), reused by every partition it runs
    layout = Layout(Store.open(root))
    return load_model(layout, read_card(layout, model, version), device)


def run_engine(context, fn, *args, **kwargs):
    """Call an engine function; a permanent error fails the step and its run for good, others retry."""
    try:
        return fn(*args, **kwargs)
    except PermanentError as exc:
        # no step retry, and no run retry either: the instance retries failed runs (for
        # interrupted steps and lost workers), which would only repeat this failure
        context.instance.add_run_tags(context.run_id, {"dagster/retry_on_asset_or_op_failure": "false"})
        raise Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc
