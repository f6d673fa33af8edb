"""BACKFILL_DEPLOYMENT picks the executor: local processes, or one Kubernetes Job per step placed by its run's pool."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import (
    Executor,
    ExecutorDefinition,
    InitExecutorContext,
    in_process_executor,
    multiple_process_executor_requirements,
    multiprocess_executor,
)

from assets.index import INDEX_STEP_OPS
from backfill.errors import ConfigError
from backfill.settings import Settings
from backfill.storage import OBJECT_STORES, protocol_of
from ops.pools import POOL_TAG, Pools, load_pools

DEPLOYMENT_ENV = "BACKFILL_DEPLOYMENT"
EMBED_OPS = ("image_embeddings",)  # the steps that run on the backfill's pool
# on indexPool if the pools file names one: per_step_k8s_config is keyed by op name, so every op of the
# faiss_index graph (plan, the mapped add steps, finish) is listed, not the asset's name
INDEX_OPS = (*INDEX_STEP_OPS, "search_index")


def _k8s_job_executor() -> ExecutorDefinition:
    """dagster-k8s, imported only by a k8s deployment: the kubernetes client it loads costs every local
    process (code servers, run workers, step workers) about a second."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor


def executor_for(settings: Settings) -> ExecutorDefinition:
    """local: the multiprocess executor. local-in-process: every step in its run's process (one Python start
    less per run; a step killed takes its run worker with it, and the run retry resumes it). k8s: step Jobs
    on pools, which needs shared (S3) storage."""
    if settings.deployment == "local":
        return multiprocess_executor
    if settings.deployment == "local-in-process":
        return in_process_executor
    if protocol_of(settings.root) not in OBJECT_STORES:  # the protocols the engine's Store treats as S3
        raise ConfigError(
            f"{DEPLOYMENT_ENV}=k8s needs BACKFILL_ROOT=s3://bucket/prefix, got {settings.root!r}: "
            "step pods share no disk (set BACKFILL_S3_ENDPOINT_URL for an S3-compatible store)"
        )
    # a broken pools file fails at load, not at the first run
    pools = load_pools(settings.pools_file, min_grace_s=settings.embed.grace_s)
    return pooled_k8s_executor(pools)


def pool_executor_config(
    executor_config: Mapping[str, Any], pools: Pools, run_tags: Mapping[str, str]
) -> dict[str, Any]:
    """The k8s_job_executor config of one run: its pool's step config for the embedding (and index) steps.

    This is run-level on purpose. dagster-k8s 0.29 builds a step pod from the run launcher's
    config, the executor's step_k8s_config, the op's own `dagster-k8s/config` tag and
    per_step_k8s_config, but never from run tags (`include_run_tags=False` for steps), so a
    pool tag on a backfill can only reach step pods through the executor's config.
    """
    config = dict(executor_config)
    per_step = dict(config.get("per_step_k8s_config") or {})
    chosen = {op: pools.for_tags(run_tags) for op in EMBED_OPS}
    if pools.index_pool:
        chosen.update({op: pools.get(pools.index_pool) for op in INDEX_OPS})
    for op, pool in chosen.items():
        per_step.setdefault(op, pool.k8s_config())  # an explicit per_step_k8s_config in run config wins
    config["per_step_k8s_config"] = per_step
    return config


def runs_on_pool(step_keys) -> bool:
    """Whether a run has a step that goes to the backfill's pool (an index-only run does not, and
    tagging it would count it against that pool's run limit)."""
    return any(key in EMBED_OPS for key in step_keys)


class PooledK8sExecutor(Executor):
    """k8s_job_executor, built per run once the run's pool tag is known."""

    def __init__(self, init_context: InitExecutorContext, pools: Pools) -> None:
        self._init, self._pools = init_context, pools
        # retries and step dependencies are needed before execute(); they do not depend on the pool
        self._base = _k8s_job_executor().executor_creation_fn(init_context)

    @property
    def retries(self):
        return self._base.retries

    @property
    def step_dependency_config(self):
        return self._base.step_dependency_config

    def execute(self, plan_context, execution_plan):
        run = plan_context.dagster_run
        if POOL_TAG not in run.tags and runs_on_pool(execution_plan.step_keys_to_execute):
            # make the default pool explicit: the UI shows it, and the step pods read it for their device
            plan_context.instance.add_run_tags(run.run_id, {POOL_TAG: self._pools.default})
        config = pool_executor_config(self._init.executor_config, self._pools, run.tags)
        inner = _k8s_job_executor().executor_creation_fn(
            InitExecutorContext(
                job=self._init.job,
                executor_def=self._init.executor_def,
                executor_config=config,
                instance=self._init.instance,
            )
        )
        yield from inner.execute(plan_context, execution_plan)


def pooled_k8s_executor(pools: Pools) -> ExecutorDefinition:
    return ExecutorDefinition(
        name="k8s",
        config_schema=_k8s_job_executor().config_schema,
        requirements=multiple_process_executor_requirements(),
        executor_creation_fn=lambda init_context: PooledK8sExecutor(init_context, pools),
        description=f"k8s_job_executor whose step pods go to the pool named by the run tag {POOL_TAG} "
        f"(default {pools.default}; pools: {', '.join(sorted(pools.pools))}).",
    )
