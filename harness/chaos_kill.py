"""What the chaos harness kills: step processes, run workers, code servers, the daemon (then started again), S3."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.local_instance import (
    children,
    code_server_pids,
    run_worker_pids,
    start_daemon,
    start_time,
    step_worker_pids,
    stop,
)

# the kinds of process (or server) a kill may hit; a round draws from ChaosConfig.targets
TARGETS = ("step", "run_worker", "code_server", "daemon", "s3")


class Daemon:
    """The chaos run's dagster-daemon, which the killer may end and start again (a crashed or drained pod)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.lock = threading.Lock()
        self.proc = start_daemon(env, log)
        self.old_groups: list[int] = []  # ended daemons' process groups: their run workers may live on
        self.restarted_at: list[float] = []  # time.monotonic() of every restart

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        """The exit status of a daemon that ended on its own (None while it runs or is being restarted)."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return self.proc.poll()
        finally:
            self.lock.release()

    def kill(self, signo: int, grace_s: float, restart_s: float) -> int:
        """End the daemon, start it again after restart_s; return the step processes that died with it.

        SIGKILL goes to its whole process group (the node died: daemon, code server, run workers
        and steps); SIGTERM to the daemon alone (the pod is drained: run workers, which in a
        cluster are pods of their own, keep running), then SIGKILL to the group after grace_s.
        """
        with self.lock:
            steps = step_worker_pids(self.proc.pid)
            if signo == signal.SIGKILL:
                _killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            else:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace_s)
                    steps = []  # a drained daemon leaves its run workers and steps running
                except subprocess.TimeoutExpired:
                    _killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self.old_groups.append(self.proc.pid)
            time.sleep(restart_s)
            self.proc = start_daemon(self.env, self.log)
            self.restarted_at.append(time.monotonic())
            return len(steps)

    def stop(self) -> None:
        stop(self.proc)
        for group in self.old_groups:  # run workers of a drained daemon may outlive it
            _killpg(group, signal.SIGKILL)


def _descendants(pid: int) -> set[int]:
    tree, found, stack = children(), set(), [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _killpg(pgid: int, signo: int) -> None:
    try:
        os.killpg(pgid, signo)
    except ProcessLookupError:
        pass


def kill_if_alive(pid: int, born: str | None) -> None:
    if born is None or start_time(pid) != born:
        return  # it ended (and the pid may now be someone else's)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Kill:
    target: str
    signo: int
    late: bool  # only the index build and publish were left
    steps: int = 1  # step processes it ended (a daemon's SIGKILL ends all of them)


@dataclass
class Killer:
    """Every 0.5-6 s, signal a random process of a random target kind; record each kill.

    Half the step kills go to a step that is embedding (it has written to the work log), so
    they land mid-chunk rather than during process start-up. In half the rounds, the first
    step that starts once every shard is embedded (the index build) is hunted too. The
    daemon is killed at most once a round (each restart costs a code server start);
    S3 goes down only once every shard is embedded (the index build and publish).
    """

    daemon: Daemon
    rng: random.Random
    targets: tuple[str, ...]
    kills_wanted: int
    sigterm_share: float
    pod_grace_s: float
    daemon_restart_s: float
    late: Callable[[], bool]
    embedding: Callable[[], set[int]]
    s3_outage: Callable[[], None] | None = None
    first: str = ""  # the first kill's target, if not drawn
    crash_after_shards: int = 0  # if set, the first kill: the daemon's group, once this many shards are embedded
    shards_done: Callable[[], int] = lambda: 0
    kills: list[Kill] = field(default_factory=list)

    def run(self, done: threading.Event) -> None:
        if self.crash_after_shards:
            # the measured crash: SIGKILL to the daemon's process group once that many shards are embedded
            while self.shards_done() < self.crash_after_shards:
                if done.wait(0.2):
                    return
            self.kills.append(self._kill("daemon", signal.SIGKILL, False))
        hunt_index = self.rng.random() < 0.5
        while len(self.kills) < self.kills_wanted:
            if done.wait(0.05 if self.late() and hunt_index else self.rng.uniform(0.5, 6.0)):
                return
            index_phase = self.late()
            if hunt_index and not index_phase and len(self.kills) == self.kills_wanted - 1:
                continue  # the last kill of a hunting round is kept for the index build
            target = self.first if self.first and not self.kills else self.rng.choice(self._open_targets(index_phase))
            signo = signal.SIGTERM if self.rng.random() < self.sigterm_share else signal.SIGKILL
            kill = self._kill(target, signo, index_phase)
            if kill:
                self.kills.append(kill)
                hunt_index = hunt_index and not index_phase

    def _open_targets(self, index_phase: bool) -> list[str]:
        done = {k.target for k in self.kills}
        open_ = [t for t in self.targets if not (t == "daemon" and "daemon" in done)]
        open_ = [t for t in open_ if t != "s3" or (index_phase and self.s3_outage and "s3" not in done)]
        return open_ or ["step"]

    def _kill(self, target: str, signo: int, late: bool) -> Kill | None:
        if target == "daemon":
            steps = self.daemon.kill(signo, self.pod_grace_s, self.daemon_restart_s)
            return Kill(target, signo, late, steps)
        if target == "s3":
            assert self.s3_outage is not None
            self.s3_outage()
            return Kill(target, signal.SIGKILL, late, 0)
        pid = self._pick(target)
        if pid is None:
            return None
        # a run worker's steps run in its pod here (the multiprocess executor): they die with it
        tree = [pid, *_descendants(pid)] if target == "run_worker" else [pid]
        born = {p: start_time(p) for p in tree}
        # what it may cost: the chunk in hand of each step process at or below it
        steps = 1 if target == "step" else len(set(step_worker_pids(self.daemon.pid)) & set(tree))
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            return None
        if signo == signal.SIGKILL:
            for p in tree[1:]:
                kill_if_alive(p, born[p])
        else:
            # as Kubernetes does: whatever is still running after the grace period is killed
            for p in tree:
                threading.Timer(self.pod_grace_s, kill_if_alive, args=(p, born[p])).start()
        return Kill(target, signo, late, steps)

    def _pick(self, target: str) -> int | None:
        root = self.daemon.pid
        if target == "step":
            pids = step_worker_pids(root)
            busy = [p for p in pids if p in self.embedding()]
            if busy and self.rng.random() < 0.5:
                pids = busy
        elif target == "run_worker":
            # one whose step is embedding (a backfill run, mid-chunk) where there is one; the round's
            # first kill waits for one (the suite's round must not spend it on a model_version run)
            pids = run_worker_pids(root)
            busy = [p for p in pids if _descendants(p) & self.embedding()]
            pids = busy if busy or (self.first == "run_worker" and not self.kills) else pids
        else:
            pids = code_server_pids(root)
        return self.rng.choice(pids) if pids else None
