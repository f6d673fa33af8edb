"""model_version: a registered version's artifact checksummed, loaded and probed in a step, never in a sensor."""

from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    Backoff,
    Failure,
    Jitter,
    MaterializeResult,
    RetryPolicy,
    asset,
)

from assets.partitions import model_versions
from assets.resources import BackfillResource, run_engine
from backfill.registry import ModelCard, read_card
from backfill.storage import Layout

# requested once when the registry sensor adds the version (the first evaluation included, like
# EMBED_WHEN_MISSING); a version that failed verification stays missing and is not requested again
VERIFY_WHEN_MISSING = (
    AutomationCondition.missing()
    .newly_true()
    .since(AutomationCondition.newly_requested() | AutomationCondition.newly_updated())
    .with_label("missing_since_requested")
    & ~AutomationCondition.in_progress()
).with_label("verify_when_missing")


def verify_version(layout: Layout, model: str, version: str) -> ModelCard:
    """The card of a version whose artifact matches its sha256, loads, and embeds a probe batch finitely."""
    card = read_card(layout, model, version)
    # on the CPU whatever pool embeds it: this checks the artifact, not the device (a GPU pool's
    # device is checked by the embedding step itself, which never falls back to the CPU)
    from backfill.runtime import load_model  # torch: in this step only, not in the definitions

    load_model(layout, card, "cpu")
    return card


@asset(
    partitions_def=model_versions,
    automation_condition=VERIFY_WHEN_MISSING,
    # a store that is unreachable for a moment; a broken artifact is permanent and not retried
    retry_policy=RetryPolicy(max_retries=3, delay=10, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS),
    check_specs=[
        AssetCheckSpec(
            "verified",
            asset="model_version",
            blocking=True,
            description="the artifact (torch.export .pt2, or deprecated TorchScript) matches model.json's sha256, "
            "loads without unpickling, and embeds a probe batch into finite vectors of the declared dim",
        )
    ],
    kinds={"pytorch"},
    description="A verified model version. image_embeddings depends on it: a version that fails verification "
    "stays missing (its check red, with the reason), so none of its shards is ever embedded.",
)
def model_version(context: AssetExecutionContext, backfill: BackfillResource) -> Iterator:
    version = context.partition_key
    try:
        card = run_engine(context, verify_version, backfill.layout(), backfill.model, version)
    except Failure as exc:
        # the check result is recorded before the step fails, so the UI shows why in red; the
        # asset is never materialized, so `~any_deps_missing()` keeps its shards from being embedded
        yield AssetCheckResult(check_name="verified", passed=False, metadata={"error": exc.description or str(exc)})
        raise
    yield MaterializeResult(
        metadata={
            "dim": card.dim,
            "input_size": card.input_size,
            "sha256": card.sha256,
            "precision": card.precision,
            "format": card.format,
            "preprocessing": card.preprocess.describe(),
        }
    )
    yield AssetCheckResult(check_name="verified", passed=True, metadata={"sha256": card.sha256})
