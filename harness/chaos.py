"""Chaos harness: real backfills under the daemon while step processes are killed; verified from storage alone."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from backfill.embed import MARKER
from backfill.manifest import list_shards
from backfill.models import Architecture, torchscript_bytes
from backfill.publish import read_pointer
from backfill.registry import register_version
from backfill.sample import SampleSpec, make_sample_corpus
from backfill.storage import Layout, Store
from backfill.verify import verify_version
from backfill.settings import DEFAULT_MODEL
from harness.local_instance import new_instance, start_daemon, step_worker_pids, stop

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

    @property
    def wasted(self) -> int:
        """Images embedded more than once: all embedding work minus what one clean pass does."""
        return max(0, self.embedded_total - (self.rows - self.rejects))

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.index_mismatch == 0 and self.pointer_ok and not self.problems


def _work_done(log: Path, version: str) -> int:
    """Images embedded for a version by every attempt, from the work log (killed attempts included)."""
    if not log.exists():
        return 0
    return sum(int(line.split()[3]) for line in log.read_text().splitlines() if line.split()[1] == version)


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


def run_chaos(config: ChaosConfig, workdir: Path, say: Callable[[str], None] = print) -> list[RoundResult]:
    from dagster import DagsterInstance

    shutil.rmtree(workdir, ignore_errors=True)
    home, root, work_log = workdir / "dagster_home", workdir / "root", workdir / "work.log"
    layout = Layout(Store.open(str(root)))
    made = make_sample_corpus(layout, SampleSpec(images=config.images, shards=config.shards, seed=config.seed))
    env = new_instance(
        home,
        root,
        BACKFILL_CHUNK_SIZE=str(config.chunk_size),
        BACKFILL_BATCH_SIZE=str(config.batch_size),
        BACKFILL_GRACE_S=str(config.grace_s),
        BACKFILL_WORK_LOG=str(work_log),  # every attempt appends "{pid} {version} {shard} {n}" per embedded batch
    )
    say(f"corpus: {made['images']} images in {made['shards']} shards, chunks of {config.chunk_size}; logs in {workdir}")
    rng = random.Random(config.seed)
    daemon = start_daemon(env, workdir / "daemon.log")
    results: list[RoundResult] = []
    try:
        instance = DagsterInstance.from_config(str(home))
        for i in range(1, config.rounds + 1):
            version = f"r{i:02d}"
            result = RoundResult(version=version)
            started = time.monotonic()
            arch = Architecture(widths=(8, 16, 16, 32), dim=32, input_size=48, seed=100 + i)
            register_version(layout, MODEL, version, torchscript_bytes(arch, calibration=128), dim=arch.dim, input_size=arch.input_size)
            done = threading.Event()
            kills: list[tuple[int, int]] = []
            all_embedded = lambda: all(  # noqa: E731 - once true, only index build and publish are left
                layout.store.exists(f"{layout.embeddings(MODEL, version, s)}/{MARKER}") for s in list_shards(layout)
            )
            embedding = lambda: _embedding_pids(work_log, version)  # noqa: E731
            killer = threading.Thread(
                target=_kill_randomly, args=(daemon.pid, rng, config, done, kills, all_embedded, embedding), daemon=True
            )
            killer.start()
            try:
                while True:
                    pointer = read_pointer(layout, MODEL)
                    if pointer and pointer["version"] == version:
                        break
                    if daemon.poll() is not None:
                        raise RuntimeError(f"dagster-daemon exited with {daemon.returncode}; see {workdir / 'daemon.log'}")
                    if time.monotonic() - started > config.round_timeout_s:
                        result.problems.append(f"not published within {config.round_timeout_s:.0f}s")
                        break
                    time.sleep(0.5)
            finally:
                done.set()
                killer.join()
            result.wall_s = time.monotonic() - started
            for signo, late in kills:
                result.sigterm += signo == signal.SIGTERM
                result.sigkill += signo == signal.SIGKILL
                result.index_kills += late
            verdict = verify_version(layout, MODEL, version)
            result.rows, result.rejects = verdict.rows, verdict.rejects
            result.lost, result.duplicated = verdict.lost, verdict.duplicated
            result.index_mismatch, result.pointer_ok = verdict.index_mismatch, verdict.pointer_ok
            result.problems += verdict.problems
            result.embedded_total = _work_done(work_log, version)
            result.step_retries, result.run_retries = retries(instance, version)
            results.append(result)
            with open(workdir / "results.jsonl", "a") as f:
                f.write(json.dumps({**asdict(result), "wasted": result.wasted}) + "\n")
            say(_row(result))
    finally:
        stop(daemon)
    return results


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _kill_if_alive(pid: int, born: str | None) -> None:
    if born is None or _start_time(pid) != born:
        return  # it ended (and the pid may now be someone else's)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _embedding_pids(log: Path, version: str) -> set[int]:
    if not log.exists():
        return set()
    return {int(line.split()[0]) for line in log.read_text().splitlines() if line.split()[1] == version}


def _kill_randomly(
    daemon_pid: int, rng: random.Random, config: ChaosConfig, done: threading.Event, kills: list, late, embedding
) -> None:
    """Every 0.5-6 s, signal a random step process; record (signal, whether only index/publish was left).

    Half the kills go to a step that is embedding (it has written to the work log), so
    they land mid-chunk rather than during process start-up. In half the rounds, the
    first step that starts once every shard is embedded (the index build) is hunted too.
    """
    hunt_index = rng.random() < 0.5
    while len(kills) < config.kills_per_round:
        if done.wait(0.05 if late() and hunt_index else rng.uniform(0.5, 6.0)):
            return
        index_phase = late()
        if hunt_index and not index_phase and len(kills) == config.kills_per_round - 1:
            continue  # the last kill of a hunting round is kept for the index build
        pids = step_worker_pids(daemon_pid)
        busy = [p for p in pids if p in embedding()]
        if busy and rng.random() < 0.5:
            pids = busy
        if not pids:
            continue
        signo = signal.SIGTERM if rng.random() < config.sigterm_share else signal.SIGKILL
        pid = rng.choice(pids)
        born = _start_time(pid)
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            continue
        if signo == signal.SIGTERM:
            # as Kubernetes does: whatever is still running after the grace period is killed
            threading.Timer(config.pod_grace_s, _kill_if_alive, args=(pid, born)).start()
        kills.append((signo, index_phase))
        hunt_index = hunt_index and not index_phase


HEADER = f"{'round':>5} {'SIGTERM':>7} {'SIGKILL':>7} {'idx':>3} {'step_rt':>7} {'run_rt':>6} {'wasted':>6} {'waste%':>6} {'lost':>4} {'dup':>4} {'idx_diff':>8} {'ptr':>3} {'wall_s':>6}"


def _row(r: RoundResult) -> str:
    pct = 100.0 * r.wasted / r.rows if r.rows else 0.0
    row = (
        f"{r.version:>5} {r.sigterm:>7} {r.sigkill:>7} {r.index_kills:>3} {r.step_retries:>7} {r.run_retries:>6} "
        f"{r.wasted:>6} {pct:>5.1f}% {r.lost:>4} {r.duplicated:>4} {r.index_mismatch:>8} {'ok' if r.pointer_ok else 'NO':>3} {r.wall_s:>6.0f}"
    )
    return row + ("  " + "; ".join(r.problems) if r.problems else "")


def summary(results: list[RoundResult], chunk_size: int) -> str:
    kills = sum(r.sigterm + r.sigkill for r in results)
    wasted = sum(r.wasted for r in results)
    rows = sum(r.rows for r in results)
    return (
        f"rounds={len(results)} kills={kills} (SIGTERM {sum(r.sigterm for r in results)}, SIGKILL {sum(r.sigkill for r in results)}, "
        f"index/publish steps {sum(r.index_kills for r in results)}) step_retries={sum(r.step_retries for r in results)} "
        f"run_retries={sum(r.run_retries for r in results)} wasted={wasted}/{rows} ({100.0 * wasted / max(1, rows):.2f}%, "
        f"{wasted / max(1, kills):.1f} images per kill, chunk={chunk_size}) lost={sum(r.lost for r in results)} "
        f"duplicated={sum(r.duplicated for r in results)} index_mismatch={sum(r.index_mismatch for r in results)} "
        f"rounds_ok={sum(r.ok for r in results)}/{len(results)} wall={sum(r.wall_s for r in results):.0f}s"
    )
