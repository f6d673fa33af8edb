"""The Definitions: assets, checks, sensors, schedule and the one resource, configured from the environment."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import Definitions, define_asset_job

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.models import model_version
from assets.resources import BackfillResource
from ops.deployment import executor_from_env
from ops.retire import retire_job
from ops.schedules import embed_job, refresh_schedule
from ops.sensors import backfill_automation, index_automation, model_registry_sensor

REPO = Path(__file__).resolve().parents[1]


def _env(name: str, default: str, parse=str):
    raw = os.environ.get(name, default)
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {parse.__name__}") from None


def backfill_resource_from_env() -> BackfillResource:
    """Settings from BACKFILL_* variables; the default root is ./data in the repository."""
    env = os.environ
    root = env.get("BACKFILL_ROOT", str(REPO / "data"))
    if "://" not in root:
        root = str((REPO / root).resolve()) if not os.path.isabs(root) else root
    return BackfillResource(
        root=root,
        model=env.get("BACKFILL_MODEL", "refcnn"),
        device=env.get("BACKFILL_DEVICE", "cpu"),
        batch_size=_env("BACKFILL_BATCH_SIZE", "64", int),
        chunk_size=_env("BACKFILL_CHUNK_SIZE", "256", int),
        max_reject_rate=_env("BACKFILL_MAX_REJECT_RATE", "0.05", float),
        target_recall=_env("BACKFILL_TARGET_RECALL", "0.95", float),
        grace_s=_env("BACKFILL_GRACE_S", "20", float),
        work_log=env.get("BACKFILL_WORK_LOG", ""),
    )


index_job = define_asset_job("index_job", selection=[faiss_index, search_index])

_resource = backfill_resource_from_env()

defs = Definitions(
    assets=[model_version, image_embeddings, faiss_index, search_index],
    jobs=[embed_job, index_job, retire_job],
    sensors=[model_registry_sensor, backfill_automation, index_automation],
    schedules=[refresh_schedule],
    resources={"backfill": _resource},
    # BACKFILL_DEPLOYMENT: local = each step its own process; k8s = each step its own pod on its run's pool
    executor=executor_from_env(_resource.root, _resource.grace_s),
)
