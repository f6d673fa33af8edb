"""The chaos harness, one short round: real backfill under the daemon, a run worker and steps killed, nothing lost."""

import pytest

from harness.chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.e2e


def test_one_round_with_kills_loses_and_duplicates_nothing(tmp_path, postgres):
    """On PostgreSQL, as deployed (scripts/chaos.py runs many rounds on either storage, more kinds of kill)."""
    config = ChaosConfig(
        rounds=1,
        images=120,
        shards=3,
        chunk_size=8,
        batch_size=4,
        kills_per_round=2,
        seed=3,
        targets=("step", "run_worker"),
        first_target="run_worker",  # the run worker with its steps (its pod), then a step or another run worker
    )
    (result,) = run_chaos(config, tmp_path / "chaos", say=lambda line: None, postgres=postgres)
    assert result.sigterm + result.sigkill == 2, "the killer found no step process to kill"
    assert result.targets.get("run_worker", 0) >= 1, result.targets
    assert result.lost == 0 and result.duplicated == 0 and result.index_mismatch == 0, result
    assert result.pointer_ok and not result.problems, result
    assert result.rows == 120 and result.embedded_total >= 120
    # a kill costs at most the chunk in hand (of each step it ended)
    assert result.wasted <= config.chunk_size * 2 and result.waste_ok, result
