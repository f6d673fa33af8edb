"""faiss_index (build and check, per model version) and search_index (publish, gated by the checks)."""

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AutomationCondition,
    DynamicOut,
    DynamicOutput,
    Failure,
    In,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    Nothing,
    OpExecutionContext,
    Out,
    Output,
    asset,
    graph_asset,
    op,
)

from assets.embeddings import image_embeddings
from assets.io import store_io_manager
from assets.k8s import STEP_K8S_TAGS
from assets.partitions import model_versions
from assets.partitions import shards as shards_def
from assets.resources import BackfillResource, run_engine
from backfill.incremental import try_update
from backfill.index import add_parts, finish_build, latest_build, read_build, shard_groups, start_build
from backfill.index_build import BuildWork
from backfill.publish import publish
from backfill.registry import read_card

PUBLISH_POOL = "index_publish"


# the steps of faiss_index (ops/deployment.py places them on the index pool by these names)
INDEX_STEP_OPS = ("faiss_index_plan", "faiss_index_add", "faiss_index_finish")
INDEX_IO = "index_io"  # passes small JSON between the steps through the backfill root (assets/io.py)


@op(
    name="faiss_index_plan",
    ins={"embeddings": In(Nothing)},
    out={"plan": Out(dict, io_manager_key=INDEX_IO), "groups": DynamicOut(dict, io_manager_key=INDEX_IO)},
    tags=STEP_K8S_TAGS,
    description="Scan, plan and train a full build (its shards fanned out in groups), or the near-line update.",
)
def plan_index_build(context: OpExecutionContext, backfill: BackfillResource):
    version = context.partition_key
    layout, config = backfill.layout(), backfill.index_config()
    card = run_engine(context, read_card, layout, backfill.model, version)
    # the registered shard partitions: a manifest the registry sensor refused is not part of the corpus yet
    registered = sorted(context.instance.get_dynamic_partitions(shards_def.name))
    # a version that already has a checked build gets the new shards added to it (the near-line path)
    log = context.log.info
    attempt = run_engine(context, try_update, layout, backfill.model, version, registered, config, log=log)
    plan = {"model_created": card.created, "reason": attempt.reason}
    if attempt.outcome is not None:
        done = attempt.outcome
        plan.update(mode=done.mode, reason=done.reason, build_id=done.build.build_id)
        plan.update(base_build_id=done.base_build_id, added_shards=list(done.added_shards))
        yield Output(plan, "plan")
        # one empty group, so that the collecting step runs (it reports the update)
        yield DynamicOutput({"folder": "", "shards": []}, mapping_key="none", output_name="groups")
        return
    log(f"full build: {attempt.reason}")
    work = run_engine(
        context,
        start_build,
        layout,
        backfill.model,
        version,
        registered,
        config,
        log=log,
        ids_checked=attempt.ids_checked,
    )
    plan.update(mode="full", folder=work.folder)
    yield Output(plan, "plan")
    for i, group in enumerate(shard_groups(work, config.add_parallelism, config.min_group_vectors)):
        yield DynamicOutput({"folder": work.folder, "shards": group}, mapping_key=f"group_{i}", output_name="groups")


@op(
    name="faiss_index_add",
    out=Out(dict, io_manager_key=INDEX_IO),
    tags=STEP_K8S_TAGS,
    description="One group of shards added to copies of the trained index, each committed as its part file.",
)
def add_index_parts(context: OpExecutionContext, backfill: BackfillResource, group: dict) -> dict:
    if not group["shards"]:
        return {"add_s": 0.0, "parts_built": 0, "parts_reused": 0, "largest_block": 0}
    layout = backfill.layout()
    work = run_engine(context, BuildWork.load, layout, group["folder"])
    added = run_engine(context, add_parts, layout, work, group["shards"])
    context.log.info(f"{len(group['shards'])} shards: {added}")
    return added


@op(
    name="faiss_index_finish",
    out={"result": Out(Nothing), "check": Out(Nothing)},
    tags=STEP_K8S_TAGS,
    description="Merge the parts, merge their ground truth, tune nprobe, write the build; report recall_at_10.",
)
def finish_index_build(context: OpExecutionContext, backfill: BackfillResource, plan: dict, added: list[dict]):
    layout = backfill.layout()
    if plan["mode"] == "full":
        work = run_engine(context, BuildWork.load, layout, plan["folder"])
        build = run_engine(
            context, finish_build, layout, work, added, model_created=plan["model_created"], log=context.log.info
        )
    else:
        build = run_engine(context, read_build, layout, backfill.model, plan["build_id"])
    yield MaterializeResult(
        metadata={
            "build_id": build.build_id,
            "mode": plan["mode"],
            "mode_reason": plan["reason"],
            "base_build_id": plan.get("base_build_id", ""),
            "added_shards": MetadataValue.json(plan.get("added_shards", [])),
            "index_type": build.index_type,
            "vectors": build.vectors,
            "rejects": build.rejects,
            "shards": build.shards,
            "nlist": build.nlist,
            "nprobe": build.nprobe,
            "recall_at_10": MetadataValue.float(build.recall_at_k),
            "recall_by_nprobe": MetadataValue.json(build.recall_by_nprobe),
            "bytes": build.index_bytes,
            "build_s": MetadataValue.float(build.build_s),
            # how it was built: the plan rule's reason, the budget, seconds per step (empty for older builds)
            "plan": build.plan,
            "memory_budget_mb": build.memory_budget_mb,
            "step_s": MetadataValue.json({k: v for k, v in build.steps.items() if k.endswith("_s")}),
            "parts": MetadataValue.json({k: v for k, v in build.steps.items() if not k.endswith("_s")}),
            "path": MetadataValue.path(layout.store.display(build.path)),
        },
        check_results=[
            AssetCheckResult(
                check_name="recall_at_10",
                passed=build.passed,
                metadata={"recall_at_10": build.recall_at_k, "target": build.target_recall, "nprobe": build.nprobe},
            )
        ],
    )


@graph_asset(
    partitions_def=model_versions,
    ins={
        "embeddings": AssetIn(
            image_embeddings.key,
            partition_mapping=MultiToSingleDimensionPartitionMapping(partition_dimension_name="model_version"),
            dagster_type=Nothing,
        )
    },
    # built once every shard of the version is embedded; rebuilt when shards are re-embedded
    automation_condition=AutomationCondition.eager(),
    check_specs=[
        AssetCheckSpec(
            "recall_at_10",
            asset="faiss_index",
            blocking=True,
            description="recall@10 against exact search on held-out queries reaches target_recall",
        )
    ],
    kinds={"faiss"},
    resource_defs={INDEX_IO: store_io_manager},
    description="An immutable FAISS index build of one model version, with its measured recall: new shards are added "
    "to the version's latest checked build (no retraining) unless the grown index calls for another index type. "
    "Three steps: plan (scan, plan, train, or the near-line update), add (parallel groups of shards, each its "
    "own process or pod), finish (merge, ground truth, tune, write).",
)
def faiss_index(embeddings):
    plan, groups = plan_index_build(embeddings)
    result, check = finish_index_build(plan, groups.map(add_index_parts).collect())
    return {"result": result, "faiss_index_recall_at_10": check}


@asset(
    partitions_def=model_versions,
    deps=[faiss_index],
    automation_condition=AutomationCondition.eager(),
    # publishes read CURRENT, compare and write it: one at a time (dagster.yaml gives pools a limit of 1)
    pool=PUBLISH_POOL,
    kinds={"faiss"},
    op_tags=STEP_K8S_TAGS,
    description="The index build that search serves: CURRENT swapped atomically to the version's checked build.",
)
def search_index(context: AssetExecutionContext, backfill: BackfillResource) -> MaterializeResult:
    version = context.partition_key
    layout = backfill.layout()
    build = latest_build(layout, backfill.model, version)
    if build is None:
        raise Failure(
            description=f"no complete index build of {backfill.model}/{version} to publish", allow_retries=False
        )
    result = run_engine(context, publish, layout, backfill.model, build.build_id)
    context.log.info(result.reason)
    pointer = result.pointer or {}
    return MaterializeResult(
        metadata={
            "published": result.published,
            "reason": result.reason,
            "build_id": build.build_id,
            "serving_version": pointer.get("version", ""),
            "serving_build_id": pointer.get("build_id", ""),
            "recall_at_10": MetadataValue.float(build.recall_at_k),
        }
    )
