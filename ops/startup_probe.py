"""The start-up probe's code location: this project's definitions, plus one job whose step does what a partition's
step does before its body: the resource, the storage, the engine with torch (ops/startup.py launches it on a
scratch instance, through the instance's own launcher and executor, and times its runs' phases)."""

from __future__ import annotations

import importlib

from dagster import Definitions, definitions, job, op

from assets.resources import BackfillResource
from backfill.settings import Settings
from ops.definitions import build_definitions
from ops.startup import PROBE_JOB


@op(description="Loads what an image_embeddings step loads before its body; embeds nothing.")
def load_engine(backfill: BackfillResource) -> None:
    backfill.layout()  # the store, opened as the step opens it
    importlib.import_module("torch")
    importlib.import_module("backfill.embed")  # the name `backfill` is the resource here, hence importlib


@job(name=PROBE_JOB, description="The plan's start-up probe: a partition's processes and imports, no work.")
def startup_probe() -> None:
    load_engine()


@definitions
def defs() -> Definitions:
    """The same definitions the run workers and steps load (and the same executor), with the probe job."""
    return Definitions.merge(build_definitions(Settings.from_env()), Definitions(jobs=[startup_probe]))
