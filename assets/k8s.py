"""Kubernetes settings every step pod needs whatever its pool (pools: ops/pools.py and deploy/pools.yaml)."""

# backoffLimit 0: Kubernetes must never restart a step pod itself. A pod-level retry of a
# step makes Dagster believe the step already started and the run hangs (dagster issue
# 33755); retries belong to Dagster (RetryPolicy, run retries), which resume from chunks.
STEP_K8S_TAGS = {"dagster-k8s/config": {"job_spec_config": {"backoff_limit": 0}}}
