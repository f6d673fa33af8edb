"""faiss_index (build and check, per model version) and search_index (publish, gated by the checks)."""

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AutomationCondition,
    Failure,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    asset,
)

from assets.embeddings import image_embeddings
from assets.k8s import STEP_K8S_TAGS
from assets.partitions import model_versions
from assets.partitions import shards as shards_def
from assets.resources import BackfillResource, run_engine
from backfill.incremental import build_or_update
from backfill.index import latest_build
from backfill.publish import publish
from backfill.registry import read_card

PUBLISH_POOL = "index_publish"


@asset(
    partitions_def=model_versions,
    deps=[
        AssetDep(
            image_embeddings,
            partition_mapping=MultiToSingleDimensionPartitionMapping(partition_dimension_name="model_version"),
        )
    ],
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
    op_tags=STEP_K8S_TAGS,
    description="An immutable FAISS index build of one model version, with its measured recall: new shards are added "
    "to the version's latest checked build (no retraining) unless the grown index calls for another index type.",
)
def faiss_index(context: AssetExecutionContext, backfill: BackfillResource) -> MaterializeResult:
    version = context.partition_key
    layout = backfill.layout()
    card = run_engine(context, read_card, layout, backfill.model, version)
    # the registered shard partitions: a manifest the registry sensor refused is not part of the corpus yet
    registered = sorted(context.instance.get_dynamic_partitions(shards_def.name))
    # a version that already has a checked build gets the new shards added to it (the near-line path)
    outcome = run_engine(
        context,
        build_or_update,
        layout,
        backfill.model,
        version,
        registered,
        backfill.index_config(),
        model_created=card.created,
        log=context.log.info,
    )
    build = outcome.build
    return MaterializeResult(
        metadata={
            "build_id": build.build_id,
            "mode": outcome.mode,
            "mode_reason": outcome.reason,
            "base_build_id": outcome.base_build_id,
            "added_shards": MetadataValue.json(list(outcome.added_shards)),
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
