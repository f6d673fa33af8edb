"""Run the chaos harness: real backfills while step processes get SIGKILL/SIGTERM; print the table."""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.chaos import HEADER, ChaosConfig, run_chaos, summary  # noqa: E402


def main() -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3, help="kills per round")
    parser.add_argument("--workdir", default="/tmp/backfill-chaos")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    config = ChaosConfig(rounds=args.rounds, kills_per_round=args.kills, seed=args.seed)
    print(HEADER, flush=True)
    results = run_chaos(config, Path(args.workdir), say=lambda line: print(line, flush=True))
    print(summary(results, config.chunk_size))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
