"""Chaos harness: real backfills under the daemon while step processes are killed; verified from storage alone."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backfill.embed import MARKER
from backfill.errors import RetryableError
from backfill.index import latest_build
from backfill.manifest import list_shards
from backfill.models import Architecture, torchscript_bytes
from backfill.publish import read_pointer
from backfill.registry import register_version
from backfill.sample import SampleSpec, make_sample_corpus
from backfill.settings import DEFAULT_MODEL
from backfill.storage import Layout, Store
from backfill.verify import verify_version
from harness.chaos_kill import Daemon, Killer
from harness.chaos_verify import PointerWatcher, build_mismatch
from harness.local_instance import new_instance
from harness.local_postgres import Server
from harness.local_s3 import LocalS3

MODEL = DEFAULT_MODEL


@dataclass(frozen=True)
class ChaosConfig:
    rounds: int = 20
    images: int = 1200
    shards: int = 6
    chunk_size: int = 8
    batch_size: int = 4
    kills_per_round: int = 3  # below the RetryPolicy's max_retries, so no shard can run out of retries
    sigterm_share: float = 0.5
    grace_s: float = 2.0  # the engine's budget after SIGTERM
    pod_grace_s: float = 4.0  # then SIGKILL, as terminationGracePeriodSeconds would
    round_timeout_s: float = 420.0
    seed: int = 1
    targets: tuple[str, ...] = ("step",)  # what a kill may hit (harness.chaos_kill.TARGETS)
    daemon_restart_s: float = 2.0  # a killed daemon is started again this long after it ended
    pair_share: float = 0.0  # the share of rounds that register two versions at once
    s3_down_s: float = 8.0  # an S3 outage (target "s3", an S3 root only) lasts this long
    first_target: str = ""  # every round's first kill hits this kind (the suite's round: a new kind for sure)
    crash_after_shards: int = 0  # if set, every round's first kill is SIGKILL to the daemon's group after N shards


@dataclass
class RoundResult:
    version: str
    sigterm: int = 0
    sigkill: int = 0
    index_kills: int = 0  # kills after every shard was embedded: the index build or publish step
    step_retries: int = 0
    run_retries: int = 0
    embedded_total: int = 0  # images embedded by every attempt, killed ones included
    rows: int = 0
    rejects: int = 0
    lost: int = 0
    duplicated: int = 0
    index_mismatch: int = 0
    pointer_ok: bool = False
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    targets: dict[str, int] = field(default_factory=dict)  # kills by target kind
    steps_hit: int = 0  # step processes the kills ended (a daemon's SIGKILL ends every one): the waste budget
    chunk_size: int = 0
    versions: int = 1  # 2 in a round that backfills two versions at once
    restart_to_publish_s: float | None = None  # a daemon restart to the round's publish

    @property
    def wasted(self) -> int:
        """Images embedded more than once: all embedding work minus what one clean pass does."""
        return max(0, self.embedded_total - (self.rows - self.rejects))

    @property
    def waste_ok(self) -> bool:
        """At most the chunk in hand of each step process a kill ended."""
        return self.wasted <= self.chunk_size * max(1, self.steps_hit)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.index_mismatch == 0
            and self.pointer_ok
            and not self.problems
        )


def _work_done(log: Path, versions: set[str]) -> int:
    """Images embedded for versions by every attempt, from the work log (killed attempts included)."""
    if not log.exists():
        return 0
    return sum(int(line.split()[3]) for line in log.read_text().splitlines() if line.split()[1] in versions)


def retries(instance, version: str) -> tuple[int, int]:
    """(steps put up for retry, runs retried) for a version's embedding and index runs."""
    from dagster import DagsterEventType, RunsFilter

    step_retries = run_retries = 0
    for tags in ({"dagster/partition/model_version": version}, {"dagster/partition": version}):
        for record in instance.get_run_records(RunsFilter(tags=tags)):
            run = record.dagster_run
            # counted when the step asks for a retry: a retried step may be killed again
            # before it starts, so counting restarts would miss it
            step_retries += len(instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY))
            run_retries += 1 if run.parent_run_id else 0
    return step_retries, run_retries


@dataclass
class Corpus:
    """What every round shares: the root, the instance's environment and the S3 server behind the root, if any."""

    layout: Layout
    env: dict[str, str]
    work_log: Path
    s3: LocalS3 | None = None


def run_chaos(
    config: ChaosConfig,
    workdir: Path,
    say: Callable[[str], None] = print,
    postgres: Server | None = None,
    s3: LocalS3 | None = None,
) -> list[RoundResult]:
    """Run config.rounds rounds under one daemon, restarted when killed.

    The instance is on SQLite in workdir, or in `postgres` (an empty database); the root on
    local disk, or in a bucket of `s3` (a started server, which target "s3" stops and starts).
    """
    from dagster import DagsterInstance

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    home, work_log = workdir / "dagster_home", workdir / "work.log"
    if s3:
        os.environ.update(s3.env())  # this process writes the corpus and verifies the rounds on the store too
    root = f"{s3.make_bucket('chaos')}/root" if s3 else str(workdir / "root")
    layout = Layout(Store.open(root))
    made = make_sample_corpus(layout, SampleSpec(images=config.images, shards=config.shards, seed=config.seed))
    env = new_instance(
        home,
        root,
        postgres=postgres,
        BACKFILL_CHUNK_SIZE=str(config.chunk_size),
        BACKFILL_BATCH_SIZE=str(config.batch_size),
        BACKFILL_GRACE_S=str(config.grace_s),
        BACKFILL_WORK_LOG=str(work_log),  # every attempt appends "{pid} {version} {shard} {n}" per embedded batch
        **(s3.env() if s3 else {}),
    )
    storage = "PostgreSQL" if postgres else "SQLite"
    say(
        f"corpus: {made['images']} images in {made['shards']} shards, chunks of {config.chunk_size}, instance on "
        f"{storage}, root {root}, targets {','.join(config.targets)}; logs in {workdir}"
    )
    rng = random.Random(config.seed)
    corpus = Corpus(layout, env, work_log, s3)
    daemon = Daemon(env, workdir / "daemon.log")
    results: list[RoundResult] = []
    try:
        instance = DagsterInstance.from_config(str(home))
        for i in range(1, config.rounds + 1):
            result = _round(config, corpus, daemon, instance, rng, i, workdir)
            results.append(result)
            with open(workdir / "results.jsonl", "a") as f:
                f.write(json.dumps({**asdict(result), "wasted": result.wasted}) + "\n")
            say(_row(result))
    finally:
        daemon.stop()
    return results


def _register(layout: Layout, version: str, seed: int) -> None:
    arch = Architecture(widths=(8, 16, 16, 32), dim=32, input_size=48, seed=seed)
    blob = torchscript_bytes(arch, calibration=128)
    register_version(layout, MODEL, version, blob, dim=arch.dim, input_size=arch.input_size)


def _round(config, corpus: Corpus, daemon: Daemon, instance, rng, i: int, workdir: Path) -> RoundResult:
    layout, work_log = corpus.layout, corpus.work_log
    paired = rng.random() < config.pair_share
    # in a paired round the older version is registered first: CURRENT must end on the newer
    versions = [f"r{i:02d}a", f"r{i:02d}"] if paired else [f"r{i:02d}"]
    version = versions[-1]
    result = RoundResult(version=version, chunk_size=config.chunk_size, versions=len(versions))
    started = time.monotonic()
    for n, v in enumerate(versions):
        _register(layout, v, seed=100 + 2 * i + n)
    done = threading.Event()
    watcher = PointerWatcher(layout)
    killer = Killer(
        daemon=daemon,
        rng=rng,
        targets=config.targets,
        kills_wanted=config.kills_per_round,
        sigterm_share=config.sigterm_share,
        pod_grace_s=config.pod_grace_s,
        daemon_restart_s=config.daemon_restart_s,
        # once true, only index builds and publishes are left
        late=lambda: all(
            layout.store.exists(f"{layout.embeddings(MODEL, v, s)}/{MARKER}")
            for v in versions
            for s in list_shards(layout)
        ),
        embedding=lambda: _embedding_pids(work_log, set(versions)),
        s3_outage=(lambda: _s3_outage(corpus.s3, config.s3_down_s)) if corpus.s3 else None,
        first=config.first_target,
        crash_after_shards=config.crash_after_shards,
        shards_done=lambda: sum(
            layout.store.exists(f"{layout.embeddings(MODEL, v, s)}/{MARKER}")
            for v in versions
            for s in list_shards(layout)
        ),
    )
    threads = [threading.Thread(target=killer.run, args=(done,)), threading.Thread(target=watcher.run, args=(done,))]
    for t in threads:
        t.start()
    published_at = None
    try:
        while True:
            if _finished(layout, versions):
                published_at = time.monotonic()
                break
            if daemon.exited() is not None:
                raise RuntimeError(f"dagster-daemon exited with {daemon.exited()}; see {workdir / 'daemon.log'}")
            if time.monotonic() - started > config.round_timeout_s:
                result.problems.append(f"not published within {config.round_timeout_s:.0f}s")
                break
            time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join()
    result.wall_s = time.monotonic() - started
    restarts = [t for t in daemon.restarted_at if t >= started]
    if restarts and published_at:
        result.restart_to_publish_s = published_at - restarts[-1]
    for kill in killer.kills:
        result.sigterm += kill.signo == signal.SIGTERM
        result.sigkill += kill.signo == signal.SIGKILL
        result.index_kills += kill.late
        result.targets[kill.target] = result.targets.get(kill.target, 0) + 1
        result.steps_hit += kill.steps
    _verify(result, layout, versions)
    result.problems += watcher.problems
    result.embedded_total = _work_done(work_log, set(versions))
    for v in versions:
        step_rt, run_rt = retries(instance, v)
        result.step_retries += step_rt
        result.run_retries += run_rt
    if result.ok and not result.waste_ok:
        result.problems.append(f"wasted {result.wasted} images, over one chunk per step process killed")
    return result


def _finished(layout: Layout, versions: list[str]) -> bool:
    """The newest version is published and every older one of the round has a complete build (not known yet
    while the store is down: an S3 outage of the round, which the harness itself caused)."""
    try:
        pointer = read_pointer(layout, MODEL)
        if not pointer or pointer["version"] != versions[-1]:
            return False
        return all(latest_build(layout, MODEL, v) is not None for v in versions[:-1])
    except RetryableError:
        return False


def _verify(result: RoundResult, layout: Layout, versions: list[str]) -> None:
    """From storage alone: each version's chunks exactly once; the newest published, an older one's build equal."""
    for v in versions:
        verdict = verify_version(layout, MODEL, v)
        result.rows += verdict.rows
        result.rejects += verdict.rejects
        result.lost += verdict.lost
        result.duplicated += verdict.duplicated
        if v == versions[-1]:
            result.index_mismatch += verdict.index_mismatch
            result.pointer_ok = verdict.pointer_ok
            result.problems += verdict.problems
        else:  # CURRENT names the newer version: this one's build is checked against its chunks instead
            result.problems += [p for p in verdict.problems if not p.startswith("CURRENT names")]
            result.index_mismatch += build_mismatch(layout, v, result.problems)


def _s3_outage(s3: LocalS3, down_s: float) -> None:
    """SIGKILL the S3 server, wait, start it again on its ports with its data (as a crashed node would)."""
    s3.stop(signal.SIGKILL)
    time.sleep(down_s)
    s3.start()


def _embedding_pids(log: Path, versions: set[str]) -> set[int]:
    if not log.exists():
        return set()
    return {int(line.split()[0]) for line in log.read_text().splitlines() if line.split()[1] in versions}


HEADER = (
    f"{'round':>5} {'SIGTERM':>7} {'SIGKILL':>7} {'idx':>3} {'step_rt':>7} {'run_rt':>6} {'wasted':>6} {'waste%':>6} "
    f"{'lost':>4} {'dup':>4} {'idx_diff':>8} {'ptr':>3} {'wall_s':>6} {'restart_s':>9} {'ver':>3}  targets"
)
# short names of the kill targets in the table
SHORT = {"step": "step", "run_worker": "run", "code_server": "srv", "daemon": "dmn", "s3": "s3"}


def _row(r: RoundResult) -> str:
    pct = 100.0 * r.wasted / r.rows if r.rows else 0.0
    restart = f"{r.restart_to_publish_s:.0f}" if r.restart_to_publish_s is not None else "-"
    kinds = " ".join(f"{SHORT.get(k, k)}:{n}" for k, n in sorted(r.targets.items())) or "-"
    row = (
        f"{r.version:>5} {r.sigterm:>7} {r.sigkill:>7} {r.index_kills:>3} {r.step_retries:>7} {r.run_retries:>6} "
        f"{r.wasted:>6} {pct:>5.1f}% {r.lost:>4} {r.duplicated:>4} {r.index_mismatch:>8} "
        f"{'ok' if r.pointer_ok else 'NO':>3} {r.wall_s:>6.0f} {restart:>9} {r.versions:>3}  {kinds}"
    )
    return row + ("  " + "; ".join(r.problems) if r.problems else "")


def summary(results: list[RoundResult], chunk_size: int) -> str:
    kills = sum(r.sigterm + r.sigkill for r in results)
    wasted = sum(r.wasted for r in results)
    rows = sum(r.rows for r in results)
    targets: dict[str, int] = {}
    for r in results:
        for k, n in r.targets.items():
            targets[k] = targets.get(k, 0) + n
    restarts = [r.restart_to_publish_s for r in results if r.restart_to_publish_s is not None]
    return (
        f"rounds={len(results)} kills={kills} (SIGTERM {sum(r.sigterm for r in results)}, "
        f"SIGKILL {sum(r.sigkill for r in results)}, "
        f"index/publish steps {sum(r.index_kills for r in results)}; "
        f"{', '.join(f'{k} {n}' for k, n in sorted(targets.items()))}) "
        f"step_retries={sum(r.step_retries for r in results)} "
        f"run_retries={sum(r.run_retries for r in results)} wasted={wasted}/{rows} "
        f"({100.0 * wasted / max(1, rows):.2f}%, "
        f"{wasted / max(1, kills):.1f} images per kill, chunk={chunk_size}, "
        f"rounds within one chunk per step killed {sum(r.waste_ok for r in results)}/{len(results)}) "
        f"lost={sum(r.lost for r in results)} "
        f"duplicated={sum(r.duplicated for r in results)} index_mismatch={sum(r.index_mismatch for r in results)} "
        f"paired_rounds={sum(r.versions > 1 for r in results)} "
        f"restart_to_publish_max={max(restarts, default=0):.0f}s "
        f"rounds_ok={sum(r.ok for r in results)}/{len(results)} wall={sum(r.wall_s for r in results):.0f}s"
    )
