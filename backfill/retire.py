"""Retire old model versions: their embeddings and index builds go, a marker keeps them from coming back."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from backfill.errors import ConfigError
from backfill.index import BUILD_FILE, read_build
from backfill.publish import created_at, read_pointer
from backfill.registry import list_versions
from backfill.storage import Layout


@dataclass(frozen=True)
class RetirePlan:
    model: str
    serving: str | None  # the version CURRENT names
    serving_build: str | None
    keep: list[str]  # versions that stay (serving, newer ones, and `keep` older ones for rollback)
    retire: list[str]  # versions whose embeddings and builds go
    builds: list[str] = field(default_factory=list)  # build ids to delete
    reason: str = ""

    def describe(self) -> str:
        if not self.retire and not self.builds:
            return f"{self.model}: nothing to retire ({self.reason or 'keeping ' + ', '.join(self.keep)})"
        return (
            f"{self.model}: serving {self.serving} ({self.serving_build}); "
            f"keeping {', '.join(self.keep) or 'nothing else'}; "
            f"retiring {', '.join(self.retire) or 'no version'}; deleting {len(self.builds)} index builds"
            + (f" ({', '.join(self.builds)})" if self.builds else "")
        )


def plan_retirement(layout: Layout, model: str, keep: int) -> RetirePlan:
    """What `retire` would remove, touching nothing.

    Only versions older than the serving one are retired: a newer version may have a backfill in
    flight. The `keep` newest of the older ones stay for rollback. Index builds go with their
    version; a kept version also loses its superseded builds (each near-line update writes one),
    except its newest build, its newest build that passed the recall gate (what a rollback to it
    would publish), the serving build and the one it replaced (a one-step rollback).
    """
    if not 0 <= keep <= 1000:
        raise ConfigError(f"keep must be in 0..1000 (older versions kept for rollback), got {keep}")
    pointer = read_pointer(layout, model)
    cards, _ = list_versions(layout, model)
    created = {c.version: c.created for c in cards}
    builds = _complete_builds(layout, model)
    versions = set(created) | set(layout.store.ls(layout.embeddings(model, ""))) | {v for v, _, _ in builds.values()}
    versions -= set(retired_versions(layout, model))
    if pointer is None:
        return RetirePlan(
            model,
            None,
            None,
            sorted(versions),
            [],
            reason="nothing is published yet, so every version may still be needed",
        )
    serving = pointer["version"]
    order = sorted(versions, key=lambda v: (created_at(created.get(v)), v))  # unknown (unregistered) versions first
    older = [v for v in order if created_at(created.get(v)) < created_at(pointer.get("model_created")) and v != serving]
    retire = older[: max(0, len(older) - keep)]
    kept = [v for v in order if v not in retire]
    protected = {pointer["build_id"], pointer.get("previous_build_id")}
    # a kept version keeps its newest build and its newest build that passed the recall gate:
    # when the newest failed its gate, the passing one is what a rollback to that version needs
    newest: dict[str, tuple[str, str]] = {}
    newest_passing: dict[str, tuple[str, str]] = {}
    for build_id, (version, when, passed) in builds.items():
        for latest in (newest, newest_passing) if passed else (newest,):
            if version not in latest or when > latest[version][1]:
                latest[version] = (build_id, when)
    latest = {build_id for build_id, _ in (*newest.values(), *newest_passing.values())}
    doomed = sorted(
        b for b, (version, _, _) in builds.items() if b not in protected and (version in retire or b not in latest)
    )
    return RetirePlan(model, serving, pointer["build_id"], kept, retire, doomed)


def retire(layout: Layout, plan: RetirePlan) -> None:
    """Carry out a plan: markers first (so the registry sensor stops adding those versions and
    deletes their partitions), then embeddings and builds. Safe to run again after a failure."""
    now = datetime.now(timezone.utc).isoformat()
    current = read_pointer(layout, plan.model)
    if current and current["build_id"] != plan.serving_build:
        raise ConfigError(
            f"CURRENT moved to {current['build_id']} since the plan was made "
            f"(it named {plan.serving_build}); plan again"
        )
    for version in plan.retire:
        layout.store.write_json(
            layout.retired(plan.model, version), {"version": version, "retired_at": now, "serving": plan.serving}
        )
    for version in plan.retire:
        folder = layout.embeddings(plan.model, version)
        if layout.store.exists(folder):
            layout.store.rm(folder, recursive=True)
    for build_id in plan.builds:
        # build.json first: a half-deleted build is then an incomplete one that nothing reads
        folder = layout.index_build(plan.model, build_id)
        if layout.store.exists(f"{folder}/{BUILD_FILE}"):
            layout.store.rm(f"{folder}/{BUILD_FILE}")
        layout.store.rm(folder, recursive=True)


def retired_versions(layout: Layout, model: str) -> list[str]:
    return [n[: -len(".json")] for n in layout.store.ls(layout.retired(model)) if n.endswith(".json")]


def _complete_builds(layout: Layout, model: str) -> dict[str, tuple[str, str, bool]]:
    """build_id -> (version, created, passed) of every build with its build.json (others may be in progress)."""
    found = {}
    for build_id in layout.store.ls(layout.index_builds(model)):
        if layout.store.exists(f"{layout.index_build(model, build_id)}/{BUILD_FILE}"):
            build = read_build(layout, model, build_id)
            found[build_id] = (build.version, build.created, build.passed)
    return found
