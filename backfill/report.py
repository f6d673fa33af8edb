"""backfill_report: what a version's backfill did and cost, from the shards' markers and the run records."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from backfill.finalise import read_marker
from backfill.manifest import list_shards
from backfill.plan import hms, money
from backfill.storage import Layout

PLAN_FOLDER = "plans"  # <root>/plans/<model>/<version>.json: the last `backfill plan` of a version


@dataclass(frozen=True)
class RunFacts:
    """One Dagster run of one image_embeddings partition, as the report needs it (no Dagster types)."""

    shard: str
    status: str  # SUCCESS, FAILURE, CANCELED, STARTED, ...
    created: float  # epoch seconds: queued by the backfill
    started: float | None
    ended: float | None
    pool: str  # the run's backfill/pool tag; "" for a run without one (the local default)
    retry_of: str = ""  # the run this one retries (run retries), "" for a first run
    step_retries: int = 0  # STEP_UP_FOR_RETRY events: preemptions and retried failures inside the run
    preemptions: int = 0  # of those, the partition's preemptions (the asset's "preempted:" warnings)
    chunks_abandoned: int = 0  # preempted with a chunk in hand that was not committed: redone by the retry


@dataclass(frozen=True)
class PartitionFacts:
    """The metadata of a partition's latest materialization (assets/embeddings.py writes it)."""

    shard: str
    images_per_s: float
    wall_s: float
    embedded_now: int
    stage_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolFacts:
    """What a pod of a pool is, for hours and cost: CPUs, GPUs, spot or not, prices per pod-hour."""

    cpus: float
    gpus: int = 0
    spot: bool = False
    price_spot: float | None = None
    price_on_demand: float | None = None


@dataclass
class Report:
    model: str
    version: str
    shards: int = 0
    complete: int = 0
    images: int = 0
    embedded: int = 0
    rejects: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    chunk_size: int = 0
    rates: list[float] = field(default_factory=list)  # img/s per partition that embedded rows
    stage_s: dict[str, float] = field(default_factory=dict)  # summed over partitions
    runs: int = 0
    run_retries: int = 0
    step_retries: int = 0
    preemptions: int = 0
    chunks_redone: int = 0
    pod_hours: float = 0.0
    core_hours: float = 0.0
    gpu_hours: float = 0.0
    spot_hours: float = 0.0
    cost: float | None = None
    wall_s: float = 0.0  # first run queued -> last run ended
    plan: dict | None = None

    @property
    def spot_share(self) -> float:
        return self.spot_hours / self.pod_hours if self.pod_hours else 0.0

    def distribution(self) -> dict[str, float]:
        """min / p50 / p90 / max of img/s per partition (nearest-rank percentiles)."""
        if not self.rates:
            return {}
        r = sorted(self.rates)
        rank = lambda q: r[min(len(r) - 1, max(0, math.ceil(q * len(r)) - 1))]  # noqa: E731
        return {"min": r[0], "p50": rank(0.5), "p90": rank(0.9), "max": r[-1]}


def build_report(
    layout: Layout,
    model: str,
    version: str,
    runs: list[RunFacts],
    partitions: list[PartitionFacts],
    pools: dict[str, PoolFacts],
    plan: dict | None = None,
) -> Report:
    """Counts from the markers (the truth on storage), time and cost from the runs, rates from the partitions."""
    report = Report(model, version, plan=plan)
    reasons: Counter = Counter()
    for shard in list_shards(layout):
        report.shards += 1
        marker = read_marker(layout, layout.embeddings(model, version, shard))
        if marker is None:
            continue
        report.complete += 1
        report.images += marker.images
        report.embedded += marker.embedded
        report.rejects += marker.rejects
        reasons.update(marker.reasons)
        report.chunk_size = report.chunk_size or marker.chunk_size
    report.reasons = dict(reasons.most_common())
    for p in partitions:
        if p.embedded_now:
            report.rates.append(p.images_per_s)
        for stage, seconds in p.stage_s.items():
            report.stage_s[stage] = report.stage_s.get(stage, 0.0) + seconds
    _add_runs(report, runs, pools)
    return report


def _add_runs(report: Report, runs: list[RunFacts], pools: dict[str, PoolFacts]) -> None:
    """Pod-, core-, GPU- and spot-hours and cost from every run's duration (failed and retried ones included)."""
    cost, priced = 0.0, True
    for run in runs:
        report.runs += 1
        report.run_retries += bool(run.retry_of)
        report.step_retries += run.step_retries
        report.preemptions += run.preemptions
        report.chunks_redone += run.chunks_abandoned
        if run.started is None:
            continue
        hours = ((run.ended or run.started) - run.started) / 3600
        pool = pools.get(run.pool, PoolFacts(cpus=0))
        report.pod_hours += hours
        report.core_hours += hours * pool.cpus
        report.gpu_hours += hours * pool.gpus
        report.spot_hours += hours if pool.spot else 0.0
        price = pool.price_spot if pool.spot else pool.price_on_demand
        priced &= price is not None
        cost += hours * (price or 0.0)
    report.cost = cost if priced and report.pod_hours else None
    times = [r.created for r in runs] + [r.ended for r in runs if r.ended]
    report.wall_s = max(times) - min(times) if times else 0.0


def report_markdown(report: Report, bins: int = 8) -> str:
    """The report as markdown: a summary table (plan beside it when there is one), stages, the img/s histogram."""
    plan = report.plan or {}
    d = report.distribution()
    rows = [
        ("shards complete", f"{report.complete:,} / {report.shards:,}", plan.get("shards")),
        ("images", f"{report.images:,} ({report.embedded:,} embedded, {report.rejects:,} rejected)",
         plan.get("images")),
        ("wall time", hms(report.wall_s), hms(plan["wall_s"]) if "wall_s" in plan else None),
        ("img/s per partition", " / ".join(f"{k} {v:,.1f}" for k, v in d.items()) or "none embedded",
         f"{plan['img_s_per_pod']:,.1f} per pod" if "img_s_per_pod" in plan else None),
        ("pod-hours", f"{report.pod_hours:,.3f}", _num(plan.get("pod_hours"))),
        ("core-hours", f"{report.core_hours:,.3f}", _num(plan.get("core_hours"))),
        ("GPU-hours", f"{report.gpu_hours:,.3f}", _num(plan.get("gpu_hours"))),
        ("on spot", f"{report.spot_share:.0%} of pod-hours", None),
        ("cost", money(report.cost), _cost(plan)),
        ("runs", f"{report.runs:,} ({report.run_retries} run retries, {report.step_retries} step retries)", None),
        ("preemptions", f"{report.preemptions}", None),
        ("wasted work", f"{report.chunks_redone} chunks redone (<= {report.chunks_redone * report.chunk_size:,} rows)",
         None),
    ]  # fmt: skip
    out = [f"# Backfill of {report.model} {report.version}", "", "| | actual | plan |", "|---|---|---|"]
    out += [f"| {what} | {actual} | {planned if planned is not None else ''} |" for what, actual, planned in rows]
    if report.reasons:
        out += ["", "**Rejects by reason**", "", "| reason | images |", "|---|---|"]
        out += [f"| {reason} | {n:,} |" for reason, n in report.reasons.items()]
    if report.stage_s:
        total = sum(v for k, v in report.stage_s.items() if not k.startswith("writer_")) or 1.0
        out += ["", "**Where the partitions' time went** (main thread; writer_* run beside it)", "",
                "| stage | seconds | share |", "|---|---|---|"]  # fmt: skip
        for stage, seconds in sorted(report.stage_s.items(), key=lambda kv: -kv[1]):
            share = "" if stage.startswith("writer_") else f"{seconds / total:.0%}"
            out.append(f"| {stage} | {seconds:,.2f} | {share} |")
    if report.rates:
        out += ["", "**img/s per partition**", "", "```", *histogram(report.rates, bins), "```"]
    return "\n".join(out)


def histogram(values: list[float], bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram: one line per bin, `lo - hi  count  ####`."""
    lo, hi = min(values), max(values)
    step = (hi - lo) / bins or 1.0
    counts = Counter(min(bins - 1, int((v - lo) / step)) for v in values)
    top = max(counts.values())
    n = bins if hi > lo else 1
    return [
        f"{lo + i * step:9,.1f} - {lo + (i + 1) * step:9,.1f}  {counts.get(i, 0):5d}  "
        f"{'#' * round(width * counts.get(i, 0) / top)}"
        for i in range(n)
    ]


def _num(value: float | None) -> str | None:
    return None if value is None else f"{value:,.3f}"


def _cost(plan: dict) -> str | None:
    if not plan:
        return None
    if plan.get("cost_spot") is None and plan.get("cost_on_demand") is None:
        return money(None)
    return f"spot {money(plan.get('cost_spot'))}, on demand {money(plan.get('cost_on_demand'))}"


def plan_path(layout: Layout, model: str, version: str) -> str:
    return layout.store.url(PLAN_FOLDER, model, f"{version}.json")


def read_plan(layout: Layout, model: str, version: str) -> dict | None:
    """The summary the last `backfill plan` (or backfill_plan asset) saved for a version, or None."""
    path = plan_path(layout, model, version)
    return layout.store.read_json(path) if layout.store.exists(path) else None


def write_plan(layout: Layout, model: str, version: str, summary: dict) -> str:
    """Save a plan's summary where read_plan (the report) finds it; the last plan of a version wins."""
    path = plan_path(layout, model, version)
    layout.store.write_json(path, summary)
    return layout.store.display(path)
