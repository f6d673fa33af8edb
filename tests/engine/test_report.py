"""The report's arithmetic: nearest-rank percentiles, the text histogram, hours and cost by pool."""

import pytest

from backfill.report import PoolFacts, Report, RunFacts, _add_runs, histogram, report_markdown


def test_distribution_is_nearest_rank():
    r = Report("m", "v1", rates=[float(x) for x in range(1, 11)])
    assert r.distribution() == {"min": 1.0, "p50": 5.0, "p90": 9.0, "max": 10.0}
    assert Report("m", "v1").distribution() == {}


def test_histogram_counts_every_value_once():
    lines = histogram([1.0, 1.0, 2.0, 10.0], bins=3)
    assert len(lines) == 3 and [int(line.split()[3]) for line in lines] == [3, 0, 1]
    assert histogram([5.0, 5.0], bins=4) == [f"{5.0:9,.1f} - {6.0:9,.1f}      2  {'#' * 40}"]


def test_hours_spot_share_and_cost_by_pool():
    pools = {"gpu": PoolFacts(cpus=8, gpus=1, spot=True, price_spot=0.5, price_on_demand=2.0),
             "index": PoolFacts(cpus=8, price_spot=0.2, price_on_demand=1.0)}  # fmt: skip
    runs = [
        RunFacts("s0", "SUCCESS", created=0.0, started=10.0, ended=3610.0, pool="gpu"),
        RunFacts("s1", "FAILURE", created=0.0, started=10.0, ended=1810.0, pool="index", step_retries=2,
                 preemptions=1, chunks_abandoned=1),
        RunFacts("s1", "SUCCESS", created=1900.0, started=1900.0, ended=3700.0, pool="index", retry_of="r1"),
        RunFacts("s2", "QUEUED", created=5.0, started=None, ended=None, pool="gpu"),
    ]  # fmt: skip
    r = Report("m", "v1", chunk_size=256)
    _add_runs(r, runs, pools)
    assert r.runs == 4 and r.run_retries == 1 and r.step_retries == 2 and r.preemptions == 1 and r.chunks_redone == 1
    assert r.pod_hours == pytest.approx(2.0) and r.gpu_hours == pytest.approx(1.0) and r.core_hours == pytest.approx(16)
    assert r.spot_share == pytest.approx(0.5) and r.cost == pytest.approx(0.5 + 1.0)
    assert r.wall_s == pytest.approx(3700.0)
    assert "1 chunks redone (<= 256 rows)" in report_markdown(r)
