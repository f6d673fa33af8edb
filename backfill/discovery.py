"""What is new in the registry and the manifest folder, and what must be skipped (with the reason)."""

from __future__ import annotations

from dataclasses import dataclass, field

from backfill.errors import BackfillError
from backfill.manifest import find_cross_shard_duplicates, list_shards, read_shard
from backfill.registry import list_versions, valid_name
from backfill.runtime import load_model
from backfill.retire import retired_versions
from backfill.storage import Layout


@dataclass
class Discovery:
    versions: list[str] = field(default_factory=list)  # every usable version, oldest first
    new_versions: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)  # every usable shard
    new_shards: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # "version v3" / "shard s9" -> why
    retired: list[str] = field(default_factory=list)  # known versions retired since: their partitions go


def discover(layout: Layout, model: str, known_versions: set[str], known_shards: set[str]) -> Discovery:
    """New valid versions and shards; a version is valid only once its artifact loads and
    produces finite vectors of its declared size, so no backfill starts from a broken one.
    A new shard is refused if its manifest is invalid or repeats an image_id of another shard.
    """
    found = Discovery()
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
            continue
        try:
            load_model(layout, card, "cpu")  # checksum, TorchScript load, probe batch
        except BackfillError as exc:
            found.skipped[f"version {card.version}"] = str(exc)
            continue
        found.versions.append(card.version)
        found.new_versions.append(card.version)

    names = list_shards(layout)
    new = [s for s in names if s not in known_shards]
    if not new:
        found.shards = [s for s in names if s in known_shards]
        return found
    ids = {}
    for name in names:
        if not valid_name(name):
            found.skipped[f"shard {name}"] = f"shard name {name!r} may only use letters, digits, '-', '_' and '.'"
            continue
        try:
            ids[name] = read_shard(layout, name).image_ids
        except BackfillError as exc:
            found.skipped[f"shard {name}"] = str(exc)
    # known shards are accepted first, so a new shard that collides is the one refused
    accepted: dict = {n: ids[n] for n in names if n in known_shards and n in ids}
    for name in new:
        if name not in ids:
            continue
        clash = find_cross_shard_duplicates({**accepted, name: ids[name]})
        if clash:
            found.skipped[f"shard {name}"] = f"{clash}: every image_id must be in exactly one shard"
            continue
        accepted[name] = ids[name]
        found.new_shards.append(name)
    found.shards = [n for n in names if n in accepted]
    return found
