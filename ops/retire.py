"""retire_job: the UI's way to retire old model versions (the same engine as `backfill retire`)."""

from dagster import Config, MetadataValue, OpExecutionContext, Output, job, op

from assets.k8s import STEP_K8S_TAGS
from assets.partitions import model_versions
from assets.resources import BackfillResource, run_engine
from backfill.retire import plan_retirement, retire


class RetireConfig(Config):
    keep: int = 1  # versions older than the serving one kept for rollback
    confirm: bool = False  # False: a dry run that only reports the plan


@op(
    tags=STEP_K8S_TAGS,
    description="Removes the embeddings, index builds and model_version partitions of versions older than the serving "
    "one, keeping `keep` of them for rollback and never the serving one or a newer one. A dry run unless confirm=true.",
)
def retire_versions(context: OpExecutionContext, config: RetireConfig, backfill: BackfillResource):
    layout = backfill.layout()
    plan = run_engine(context, plan_retirement, layout, backfill.model, config.keep)
    context.log.info(("" if config.confirm else "dry run (set confirm: true to carry it out): ") + plan.describe())
    if config.confirm:
        run_engine(context, retire, layout, plan)
        known = set(context.instance.get_dynamic_partitions(model_versions.name))
        for version in plan.retire:
            if version in known:
                context.instance.delete_dynamic_partition(model_versions.name, version)
    yield Output(
        None,
        metadata={
            "dry_run": not config.confirm,
            "serving": plan.serving or "",
            "kept": MetadataValue.json(plan.keep),
            "retired": MetadataValue.json(plan.retire),
            "deleted_builds": MetadataValue.json(plan.builds),
            "model_version_partitions": len(context.instance.get_dynamic_partitions(model_versions.name)),
        },
    )


@job(description="Retire old model versions (dry run unless confirmed in the launchpad config).")
def retire_job():
    retire_versions()
