"""StoreIOManager: small JSON values passed between steps through the backfill root, so step pods share them."""

from __future__ import annotations

from typing import Any

from dagster import InputContext, IOManager, OutputContext, io_manager

from backfill.storage import Store

IO_FOLDER = "dagster-io"


class StoreIOManager(IOManager):
    """Each output is one JSON file under `<root>/dagster-io/<run id>/<step key>/<output>[/<mapping key>]`.

    Dagster's default IO manager pickles to the local disk of the process that ran the step: a step pod
    of the k8s executor cannot read what another pod wrote. These values go through the project's Store
    (a local folder or S3, written atomically), and only JSON: the index steps pass a work folder and
    shard names, never vectors (those live in the build's work folder). A re-execution reads its parent
    run's outputs by the identifier Dagster gives (the run that produced them).
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def _path(self, identifier: list[str]) -> str:
        return self.store.url(IO_FOLDER, *identifier) + ".json"

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        self.store.write_json(self._path(context.get_identifier()), obj)

    def load_input(self, context: InputContext) -> Any:
        return self.store.read_json(self._path(context.upstream_output.get_identifier()))


@io_manager(required_resource_keys={"backfill"})
def store_io_manager(init_context) -> StoreIOManager:
    """The StoreIOManager on the backfill resource's root (so it needs no settings of its own)."""
    return StoreIOManager(init_context.resources.backfill.layout().store)
