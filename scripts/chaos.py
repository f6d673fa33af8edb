"""Run the chaos harness: real backfills while steps, run workers, code servers, the daemon or S3 are killed."""

import argparse
import contextlib
import signal
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.chaos import HEADER, ChaosConfig, run_chaos, summary  # noqa: E402
from harness.chaos_kill import TARGETS  # noqa: E402


def main() -> int:
    warnings.filterwarnings("ignore")
    # a SIGTERM (e.g. from `timeout`) unwinds like an exception, so the daemon and servers are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kills", type=int, default=3, help="kills per round")
    parser.add_argument("--workdir", default="/tmp/backfill-chaos")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--storage", choices=("sqlite", "postgres"), default="sqlite", help="the instance's storage")
    parser.add_argument(
        "--targets", default="step", help=f"comma-separated kinds a kill may hit, of {','.join(TARGETS)}"
    )
    parser.add_argument("--pair-share", type=float, default=0.0, help="share of rounds with two versions at once")
    parser.add_argument("--s3", action="store_true", help="the root in a local S3 server (needed by target s3)")
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument(
        "--crash-after-shards", type=int, default=0, help="first kill: SIGKILL to the daemon's group after N shards"
    )
    parser.add_argument("--restart-s", type=float, default=2.0, help="a killed daemon starts again after this")
    parser.add_argument("--round-timeout", type=float, default=420.0, help="seconds a round may take to publish")
    args = parser.parse_args()
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = set(targets) - set(TARGETS)
    if unknown or ("s3" in targets and not args.s3):
        parser.error(f"--targets {args.targets!r}: each of {','.join(TARGETS)}; s3 needs --s3")
    config = ChaosConfig(
        rounds=args.rounds,
        kills_per_round=args.kills,
        seed=args.seed,
        targets=targets,
        pair_share=args.pair_share,
        images=args.images,
        shards=args.shards,
        crash_after_shards=args.crash_after_shards,
        daemon_restart_s=args.restart_s,
        round_timeout_s=args.round_timeout,
    )
    workdir = Path(args.workdir)
    with contextlib.ExitStack() as stack:
        postgres = s3 = None
        if args.storage == "postgres":
            from harness.local_postgres import running_postgres

            postgres = stack.enter_context(running_postgres())
        if args.s3:
            from harness.local_s3 import LocalS3

            s3 = LocalS3(workdir.with_name(workdir.name + "-s3")).start()
            stack.callback(s3.stop)
        print(HEADER, flush=True)
        results = run_chaos(config, workdir, say=lambda line: print(line, flush=True), postgres=postgres, s3=s3)
        print(summary(results, config.chunk_size))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
