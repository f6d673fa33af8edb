"""backfill_plan and backfill_report: a version's backfill estimated before launch, and accounted for after it."""

from dagster import (
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    asset,
)

from assets.embeddings import image_embeddings
from assets.models import model_version
from assets.partitions import model_versions
from assets.resources import BackfillResource, run_engine
from backfill.errors import ConfigError
from backfill.manifest import list_shards
from backfill.pipeline import cpu_budget
from backfill.plan import plan_rows, plan_summary
from backfill.report import Report, build_report, read_plan, report_markdown, write_plan
from ops.pools import Pools, load_pools, pod_spec
from ops.runs import embedding_partitions, embedding_runs, local_slots, pool_facts
from ops.startup import local_startup


class PlanConfig(Config):
    pool: str = ""  # a pool of the pools file; "" plans the local default (this machine's run slots)
    pods: int = 0  # 0: the pool's maxConcurrentRuns, or the instance's run slots for the local default
    sample_images: int = 256


@asset(
    partitions_def=model_versions,
    # after verification, beside the backfill: nothing depends on it, so it never holds a backfill back
    deps=[model_version],
    kinds={"pytorch"},
    description="Before launch: a calibration of the version on a deterministic sample of the corpus (real "
    "embed_shard work on this step's device), then the backfill's wall time, pod-, core- and GPU-hours, cost on "
    "spot and on demand, embedding bytes and the index (docs/plan.md). Materialize it by hand.",
)
def backfill_plan(context: AssetExecutionContext, config: PlanConfig, backfill: BackfillResource) -> MaterializeResult:
    # the calibration embeds a sample (torch): imported by this step, not by the definitions
    from backfill.calibrate import calibration_rows, calibration_summary, plan_version

    version = context.partition_key
    layout = backfill.layout()
    pools = _pools()
    if config.pool:
        pool = run_engine(context, _pool, pools, config.pool)
        pod, pods = pod_spec(pool), config.pods or pool.max_concurrent_runs
        device = pool.device
    else:
        pod, pods, device = None, config.pods or local_slots(context.instance), backfill.device
    # the local default's start-up: earlier embedding runs here, else a probe that launches runs on a scratch instance
    startup = None if config.pool else local_startup(context.instance, pods)
    index_threads = int(pools.get(pools.index_pool).cpus) if pools and pools.index_pool and config.pool else 0
    plan, calibration = run_engine(
        context, plan_version, layout, backfill.model, version, backfill.embed_config(device),
        backfill.index_config(), pod, pods, config.sample_images,
        index_threads=index_threads or cpu_budget(), startup=startup,
    )  # fmt: skip
    where = write_plan(layout, backfill.model, version, plan_summary(plan, **calibration_summary(calibration)))
    lines = calibration_rows(calibration) + plan_rows(plan)
    markdown = "\n".join([f"# Plan: {backfill.model} {version}", "", "| | |", "|---|---|"]
                         + [f"| {what} | {value} |" for what, value in lines])  # fmt: skip
    context.log.info(f"plan of {version}: wall {plan.wall_s:.0f} s on {pods} pods; saved to {where}")
    return MaterializeResult(
        metadata={
            "plan": MetadataValue.md(markdown),
            "wall_s": MetadataValue.float(round(plan.wall_s, 1)),
            "pods": pods,
            "img_s_per_pod": MetadataValue.float(round(plan.inputs.img_s_per_pod, 1)),
            "calibrated_img_s": MetadataValue.float(round(calibration.img_s, 1)),
            "calibration_slots": calibration.slots,
            "pod_hours": MetadataValue.float(round(plan.pod_hours, 4)),
            "gpu_hours": MetadataValue.float(round(plan.gpu_hours, 4)),
            "cost_spot": MetadataValue.float(round(plan.cost_spot or 0.0, 2)),
            "cost_on_demand": MetadataValue.float(round(plan.cost_on_demand or 0.0, 2)),
            "embedding_bytes": plan.embedding_bytes,
            "index_bytes": plan.index_bytes,
            "index_factory": plan.index_factory,
            "path": MetadataValue.path(where),
        }
    )


@asset(
    partitions_def=model_versions,
    deps=[
        AssetDep(
            image_embeddings,
            partition_mapping=MultiToSingleDimensionPartitionMapping(partition_dimension_name="model_version"),
        )
    ],
    description="After (or during) a version's backfill: images, rejects by reason, img/s per partition, where "
    "the time went, pod-, core- and GPU-hours, share on spot, preemptions, retries, chunks redone, wall time "
    "and cost, with the plan beside it when one was made (docs/plan.md). Materialize it by hand.",
)
def backfill_report(context: AssetExecutionContext, backfill: BackfillResource) -> MaterializeResult:
    version = context.partition_key
    layout = backfill.layout()
    shards = list_shards(layout)
    runs = embedding_runs(context.instance, version)
    partitions = embedding_partitions(context.instance, version, shards)
    pools = pool_facts(_pools(), cpu_budget() / local_slots(context.instance))  # a local run: its share
    plan = read_plan(layout, backfill.model, version)
    report = run_engine(context, build_report, layout, backfill.model, version, runs, partitions, pools, plan)
    return MaterializeResult(metadata={"report": MetadataValue.md(report_markdown(report)), **report_metadata(report)})


def report_metadata(report: Report) -> dict:
    """The report's numbers as numeric entries (plotted across versions in the UI)."""
    meta = {
        "shards": report.shards,
        "shards_complete": report.complete,
        "images": report.images,
        "rejects": report.rejects,
        "reject_reasons": MetadataValue.json(report.reasons),
        "wall_s": MetadataValue.float(round(report.wall_s, 1)),
        "pod_hours": MetadataValue.float(round(report.pod_hours, 4)),
        "core_hours": MetadataValue.float(round(report.core_hours, 4)),
        "gpu_hours": MetadataValue.float(round(report.gpu_hours, 4)),
        "spot_share": MetadataValue.float(round(report.spot_share, 3)),
        "runs": report.runs,
        "run_retries": report.run_retries,
        "step_retries": report.step_retries,
        "preemptions": report.preemptions,
        "chunks_redone": report.chunks_redone,
    }
    if report.cost is not None:
        meta["cost"] = MetadataValue.float(round(report.cost, 2))
    meta.update({f"img_s_{k}": MetadataValue.float(round(v, 1)) for k, v in report.distribution().items()})
    meta.update({f"stage_{k}_s": MetadataValue.float(round(v, 2)) for k, v in sorted(report.stage_s.items())})
    if report.plan and report.plan.get("wall_s"):
        meta["plan_wall_s"] = MetadataValue.float(round(report.plan["wall_s"], 1))
        meta["wall_vs_plan"] = MetadataValue.float(round(report.wall_s / report.plan["wall_s"], 3))
    return meta


def _pools() -> Pools | None:
    """The deployment's pools file, or None where there is none (the local default needs none)."""
    try:
        return load_pools()
    except ConfigError:
        return None


def _pool(pools: Pools | None, name: str):
    if pools is None:
        raise ConfigError(f"pool {name!r}: no pools file (set BACKFILL_POOLS_FILE), so no pool to plan for")
    return pools.get(name)
