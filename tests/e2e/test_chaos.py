"""The chaos harness, one short round: real backfill under the daemon, step processes killed, nothing lost."""

import pytest

from harness.chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.e2e


def test_one_round_with_kills_loses_and_duplicates_nothing(tmp_path):
    config = ChaosConfig(rounds=1, images=120, shards=3, chunk_size=8, batch_size=4, kills_per_round=2, seed=3)
    (result,) = run_chaos(config, tmp_path / "chaos", say=lambda line: None)
    assert result.sigterm + result.sigkill == 2, "the killer found no step process to kill"
    assert result.lost == 0 and result.duplicated == 0 and result.index_mismatch == 0, result
    assert result.pointer_ok and not result.problems, result
    assert result.rows == 120 and result.embedded_total >= 120
    # a kill costs at most the chunk in hand
    assert result.wasted <= config.chunk_size * 2
