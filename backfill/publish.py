"""publish: point CURRENT at a checked, immutable index build with one atomic write."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from backfill.errors import IncompleteError, QualityGateError
from backfill.index import INDEX_FILE, IndexBuild, read_build
from backfill.storage import Layout


@dataclass(frozen=True)
class PublishResult:
    published: bool
    reason: str
    pointer: dict[str, Any] | None


def read_pointer(layout: Layout, model: str) -> dict[str, Any] | None:
    """What CURRENT names for a model, or None when nothing was ever published."""
    try:
        return layout.store.read_json(layout.pointer(model))
    except FileNotFoundError:
        return None


def publish(layout: Layout, model: str, build_id: str, *, force: bool = False) -> PublishResult:
    """Swap CURRENT to a build that passed its recall gate and whose index file is intact.

    The previous index keeps serving until the single write of CURRENT lands. A build
    of an older model version than the one serving is not published unless forced
    (that is a rollback, and says so). The read-check-write is not atomic across
    processes: callers serialise publishes (the search_index asset runs in a Dagster
    concurrency pool of one).
    """
    build = read_build(layout, model, build_id)
    if not build.passed:
        raise QualityGateError(
            f"index build {model}/{build_id} has recall@{build.k}={build.recall_at_k} below its target "
            f"{build.target_recall}: not publishing; the current index keeps serving"
        )
    _verify_index_file(layout, build)
    current = read_pointer(layout, model)
    if current and current.get("build_id") == build_id:
        return PublishResult(False, f"{build_id} is already published", current)
    if current and not force and created_at(current.get("model_created")) > created_at(build.model_created):
        return PublishResult(
            False,
            f"not published: {model}/{current['version']} (newer than {build.version}) is serving; "
            "use rollback to go back",
            current,
        )
    pointer = {
        "model": model,
        "version": build.version,
        "build_id": build_id,
        "index_type": build.index_type,
        "vectors": build.vectors,
        "nprobe": build.nprobe,
        "recall_at_k": build.recall_at_k,
        "k": build.k,
        "model_created": build.model_created,
        "published_at": datetime.now(timezone.utc).isoformat(),
        "previous_build_id": current.get("build_id") if current else None,
    }
    layout.store.write_json(layout.pointer(model), pointer)
    return PublishResult(True, f"published {build_id}" + (" (rollback)" if force else ""), pointer)


def created_at(stamp: str | None) -> datetime:
    """A model's registration time; unknown sorts first."""
    if not stamp:
        return datetime.min.replace(tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _verify_index_file(layout: Layout, build: IndexBuild) -> None:
    path = f"{layout.index_build(build.model, build.build_id)}/{INDEX_FILE}"
    try:
        digest = hashlib.sha256(layout.store.read_bytes(path)).hexdigest()
    except FileNotFoundError:
        raise IncompleteError(f"index build {build.model}/{build.build_id} has no {INDEX_FILE}") from None
    if digest != build.index_sha256:
        raise IncompleteError(
            f"index build {build.model}/{build.build_id}: {INDEX_FILE} does not match its recorded sha256"
        )
