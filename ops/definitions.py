"""The Definitions: assets, checks, sensors, schedule and the resource, built from Settings when Dagster loads them."""

from __future__ import annotations

from dagster import Definitions, define_asset_job, definitions

from assets.embeddings import image_embeddings
from assets.index import faiss_index, search_index
from assets.models import model_version
from assets.report import backfill_plan, backfill_report
from assets.resources import BackfillResource
from backfill.settings import Settings
from ops.deployment import executor_for
from ops.pools import pool_tags
from ops.rescue import rescue_sensor
from ops.retire import retire_job
from ops.schedules import embed_job, refresh_schedule_for
from ops.sensors import backfill_automation, index_automation, registry_sensor

index_job = define_asset_job("index_job", selection=[faiss_index, search_index])


def build_definitions(settings: Settings) -> Definitions:
    """Everything Dagster runs, configured by `settings`; a bad pool or pools file fails here, at load."""
    tags = pool_tags(
        settings.pool, settings.pools_file
    )  # BACKFILL_POOL: the pool of what sensors and the schedule launch
    return Definitions(
        assets=[model_version, image_embeddings, faiss_index, search_index, backfill_plan, backfill_report],
        jobs=[embed_job, index_job, retire_job],
        sensors=[
            registry_sensor(settings.sensor_interval_s, settings.discovery),
            backfill_automation(settings.automation_interval_s, tags),
            index_automation(settings.automation_interval_s),
            rescue_sensor(),
        ],
        schedules=[refresh_schedule_for(settings.refresh_cron, tags)],
        resources={"backfill": BackfillResource.from_settings(settings)},
        # BACKFILL_DEPLOYMENT: local = each step its own process; k8s = each step its own pod on its run's pool
        executor=executor_for(settings),
    )


@definitions
def defs() -> Definitions:
    """The Definitions of this process's environment (workspace.yaml and `-m ops.definitions` load this).

    Dagster's lazy definitions: importing this module reads no environment; Dagster calls this when it
    loads the code location, and a bad setting fails that load naming its variable.
    """
    return build_definitions(Settings.from_env())
