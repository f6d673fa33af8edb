"""What is new in the registry and the manifest folder, what must be skipped (with the reason), at O(new) per call."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from backfill.errors import BackfillError, ConfigError, PermanentError, RetryableError
from backfill.manifest import list_shards
from backfill.registry import list_versions, valid_name
from backfill.retire import retired_versions
from backfill.shard_summary import (
    Catalog,
    ShardSummary,
    first_common_id,
    load_catalog,
    read_ids,
    save_catalog,
    summarise,
)
from backfill.storage import Layout

# manifests read at once: a tick is bound by the store's latency (a GET and a PUT per shard), not by CPU
READ_WORKERS = 8


@dataclass(frozen=True)
class DiscoveryBudget:
    """How much one call may do; what is left over is found by the next call (it is still new then)."""

    max_shards: int = 1000  # manifests read per call
    max_seconds: float = 20.0  # well under a sensor tick's 60 s limit
    max_overlap_ids: int = 50_000_000  # ids of earlier shards read per call for id-range overlaps

    def __post_init__(self) -> None:
        for name in ("max_shards", "max_seconds", "max_overlap_ids"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"DiscoveryBudget.{name} must be positive, got {getattr(self, name)}")


@dataclass
class Discovery:
    versions: list[str] = field(default_factory=list)  # every usable version, oldest first
    new_versions: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)  # every usable shard
    new_shards: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # "version v3" / "shard s9" -> why
    retired: list[str] = field(default_factory=list)  # known versions retired since: their partitions go
    pending: int = 0  # shards left for a later call by the budget
    held_versions: list[str] = field(default_factory=list)  # new versions waiting until no shard is pending
    # accepted although their id range overlaps more earlier ids than one call may read: the
    # index build's check_unique still refuses a duplicate before anything is published
    unverified: list[str] = field(default_factory=list)


def discover(
    layout: Layout,
    model: str,
    known_versions: set[str],
    known_shards: set[str],
    budget: DiscoveryBudget = DiscoveryBudget(),
    clock: Callable[[], float] = time.monotonic,
) -> Discovery:
    """New versions (model.json parses; the artifact is verified by the model_version asset, not here)
    and new shards: only new manifests are read. A new shard is refused if its manifest is invalid or
    repeats an image_id of an accepted shard; known shards are accepted first.
    """
    found = Discovery()
    _discover_shards(layout, known_shards, budget, clock, found)
    _discover_versions(layout, model, known_versions, found)
    return found


def _discover_versions(layout: Layout, model: str, known_versions: set[str], found: Discovery) -> None:
    cards, skipped = list_versions(layout, model)
    found.skipped.update({f"version {v}": why for v, why in skipped.items()})
    retired = set(retired_versions(layout, model))
    found.retired = sorted(retired & known_versions)
    for card in cards:
        if card.version in retired:
            # `backfill retire` removed its data. Deleting the marker adds the partition back, but
            # Dagster keeps the old materializations of its image_embeddings partitions, so nothing
            # re-embeds it by itself: a re-added version needs a manual backfill of its partitions
            continue
        if card.version in known_versions:
            found.versions.append(card.version)
        elif found.pending:
            found.held_versions.append(card.version)  # its first backfill should cover every shard
        else:
            found.versions.append(card.version)
            found.new_versions.append(card.version)


class _Tick:
    """The budget of one call, spent as manifests and sidecars are read."""

    def __init__(self, budget: DiscoveryBudget, clock: Callable[[], float]) -> None:
        self.budget, self.clock = budget, clock
        self.deadline = clock() + budget.max_seconds
        self.reads = 0
        self.overlap_ids = 0

    def can_read(self) -> bool:
        return self.reads < self.budget.max_shards and self.clock() < self.deadline


def _discover_shards(
    layout: Layout, known_shards: set[str], budget: DiscoveryBudget, clock: Callable[[], float], found: Discovery
) -> None:
    tick = _Tick(budget, clock)
    catalog = load_catalog(layout)
    names = []
    for name in list_shards(layout):
        if valid_name(name):
            names.append(name)
        else:
            found.skipped[f"shard {name}"] = f"shard name {name!r} may only use letters, digits, '-', '_' and '.'"
    known = [n for n in names if n in known_shards]
    new = [n for n in names if n not in known_shards]
    changed = _summarise_known(layout, known, catalog, tick, found)
    waiting = [n for n in known if n not in catalog.summaries and n not in catalog.refused]
    if waiting:
        # known shards are accepted first: new ones wait until every known one has its summary
        found.pending = len(waiting) + len(new)
    else:
        changed |= _accept_new(
            layout, new, [catalog.summaries[n] for n in known if n in catalog.summaries], catalog, tick, found
        )
    if changed:
        save_catalog(layout, catalog)
    added = set(found.new_shards)
    found.shards = [n for n in names if (n in known_shards and n not in catalog.refused) or n in added]


def _summarise_known(layout: Layout, known: list[str], catalog: Catalog, tick: _Tick, found: Discovery) -> bool:
    """Summaries for known shards that have none (a deployment from before the catalog, or a lost catalog)."""
    changed = False
    for name in known:
        if name in catalog.refused:
            found.skipped[f"shard {name}"] = catalog.refused[name]
    todo = [n for n in known if n not in catalog.summaries and n not in catalog.refused]
    for name, outcome in _read(layout, todo, tick):
        if isinstance(outcome, PermanentError):
            catalog.refused[name] = found.skipped[f"shard {name}"] = str(outcome)
        elif isinstance(outcome, tuple):
            catalog.summaries[name] = outcome[0]
        changed |= outcome is not None and not isinstance(outcome, RetryableError)
    return changed


def _accept_new(
    layout: Layout, new: list[str], accepted: list[ShardSummary], catalog: Catalog, tick: _Tick, found: Discovery
) -> bool:
    """Read each new shard once and accept it, in name order, unless it is invalid or collides."""
    changed = False
    ranked = [s for s in accepted if s.rows]
    mins = np.array([s.min_id for s in ranked], np.int64)
    maxs = np.array([s.max_id for s in ranked], np.int64)
    for name in new:
        if name in catalog.refused:
            found.skipped[f"shard {name}"] = catalog.refused[name]
    todo = [n for n in new if n not in catalog.refused]
    for name, outcome in _read(layout, todo, tick):
        if outcome is None or isinstance(outcome, RetryableError):
            found.pending += 1  # over the budget, or the store is unreachable now: a later call reads it
            continue
        if isinstance(outcome, PermanentError):
            catalog.refused[name] = found.skipped[f"shard {name}"] = str(outcome)
            changed = True
            continue
        summary, ids = outcome
        near = [ranked[i] for i in np.flatnonzero((mins <= summary.max_id) & (maxs >= summary.min_id))]
        verdict = _clash(layout, summary, ids, near if summary.rows else [], tick)
        if verdict == "later":
            found.pending += 1
            continue
        changed = True
        if verdict:
            catalog.refused[name] = found.skipped[f"shard {name}"] = verdict
            continue
        if sum(s.rows for s in near) > tick.budget.max_overlap_ids:
            found.unverified.append(name)
        catalog.summaries[name] = summary
        found.new_shards.append(name)
        if summary.rows:
            ranked.append(summary)
            mins, maxs = np.append(mins, summary.min_id), np.append(maxs, summary.max_id)
    return changed


Outcome = tuple[ShardSummary, np.ndarray] | BackfillError | None


def _read(layout: Layout, names: list[str], tick: _Tick) -> Iterator[tuple[str, Outcome]]:
    """Summarise names in order, READ_WORKERS at a time, while the budget lasts (None: not read)."""
    with ThreadPoolExecutor(READ_WORKERS) as pool:
        for start in range(0, len(names), READ_WORKERS):
            window = names[start : start + READ_WORKERS]
            futures = []
            for name in window:
                if tick.can_read():
                    tick.reads += 1
                    futures.append(pool.submit(_summarise_or_error, layout, name))
                else:
                    futures.append(None)
            for name, future in zip(window, futures):
                yield name, None if future is None else future.result()


def _summarise_or_error(layout: Layout, name: str) -> Outcome:
    try:
        return summarise(layout, name)
    except BackfillError as exc:
        return exc


def _clash(layout: Layout, summary: ShardSummary, ids: np.ndarray, near: list[ShardSummary], tick: _Tick) -> str | None:
    """Why the shard is refused, None if it is not, or "later" if this call's overlap budget is spent."""
    cost = sum(s.rows for s in near)
    if cost > tick.budget.max_overlap_ids:
        return None  # more than any one call may read: left to the pre-publish check (Discovery.unverified)
    if tick.overlap_ids + cost > tick.budget.max_overlap_ids:
        return "later"
    tick.overlap_ids += cost
    for other in near:  # one sidecar in memory at a time
        common = first_common_id(ids, read_ids(layout, other))
        if common is not None:
            return (
                f"image_id {common} appears in manifest shards {other.name!r} and {summary.name!r}: "
                "every image_id must be in exactly one shard"
            )
    return None
