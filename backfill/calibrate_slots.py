"""calibrate_slots: one calibration slot's work, and several slots as fresh interpreters released together."""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from backfill.config import EmbedConfig
from backfill.embed import embed_shard
from backfill.errors import ConfigError
from backfill.manifest import write_shard
from backfill.registry import ModelCard, read_card
from backfill.runtime import load_model
from backfill.storage import Layout, Store

ROOT = Path(__file__).resolve().parents[1]  # first on a slot's sys.path: `backfill` imports as it does here
# a slot's interpreter: this module's _main, with no __main__ of the caller's re-run (multiprocessing's spawn would)
SLOT = "import sys; sys.path.insert(0, sys.argv[1]); from backfill.calibrate_slots import _main; _main(sys.argv[2])"
# what a slot prints, each on a line of its own (anything else it prints is ignored), and what it waits for
LOADED, READY, RESULT, GO = "backfill-slot-loaded", "backfill-slot-ready", "backfill-slot-result", "go"
DONE = {LOADED: "loaded the model", READY: "warmed up", RESULT: "finished"}  # for the messages
EXIT_S = 5.0  # a slot that printed its result exits by itself within this, else it is killed (at once on a failure)
STDERR_LINES = 3  # of a dead slot's stderr, in the error


@dataclass(frozen=True)
class SlotResult:
    """One slot's timings; start and end on time.monotonic(), one clock for every process on this machine."""

    model_load_s: float
    warm_rows: int
    warm_s: float
    start: float
    end: float
    images: int
    rejects: int
    batch_size: int
    stage_s: dict[str, float] = field(default_factory=dict)
    pid: int = 0


def embed_slot(
    layout: Layout,
    card: ModelCard,
    config: EmbedConfig,
    warm: pa.Table,
    timed: pa.Table,
    release: Callable[[str], None] | None = None,
) -> SlotResult:
    """Load the model, warm up on `warm`, embed `timed` with embed_shard in a scratch root; nothing is kept.

    `release(LOADED)` and `release(READY)` return when every slot is there: the warm-ups, then the timed
    embeddings, run side by side as a backfill's partitions do.
    """
    began = time.monotonic()
    loaded = load_model(layout, card, config.device)
    model_load_s = time.monotonic() - began
    run = replace(config, work_log=None, max_reject_rate=1.0)  # a bad sample image must not stop the clock
    with tempfile.TemporaryDirectory(prefix="backfill-calibrate-") as scratch:
        tmp = Layout(Store.open(scratch))
        write_shard(tmp, "sample", timed)
        if release is not None:
            release(LOADED)
        warm_s = 0.0
        if warm.num_rows:
            write_shard(tmp, "warmup", warm)
            warm_s = embed_shard(tmp, "warmup", loaded, run).wall_s
        if release is not None:
            release(READY)
        start = time.monotonic()
        stats = embed_shard(tmp, "sample", loaded, run)
        end = time.monotonic()
    return SlotResult(model_load_s, warm.num_rows, warm_s, start, end, stats.images, stats.rejects, stats.batch_size,
                      dict(stats.stage_s), os.getpid())  # fmt: skip


def run_slots(
    layout: Layout, card: ModelCard, config: EmbedConfig, parts: list[tuple[pa.Table, pa.Table]], what: str,
    timeout_s: float,
) -> list[SlotResult]:  # fmt: skip
    """embed_slot for each (warm, timed) of `parts`, each in an interpreter of its own, released together.

    A slot's job is JSON and Parquet (the root, the version, the settings, its rows), never a pickle; it reads
    the card and the model from the root as a partition does. A slot that exits early is named with the end of
    its stderr; past `timeout_s` (the whole of it) every slot still going is killed, and all are waited for.
    """
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="backfill-slots-") as scratch:
        procs: list[subprocess.Popen] = []
        errs = [Path(scratch) / f"slot-{j}.err" for j in range(len(parts))]
        finished = False
        try:
            for j, (warm, timed) in enumerate(parts):
                procs.append(_start(Path(scratch) / f"slot-{j}", layout, card, config, warm, timed, errs[j]))
            for word in (LOADED, READY):
                _collect(procs, errs, word, what, deadline, timeout_s)
                _release(procs, last=word == READY)
            lines = _collect(procs, errs, RESULT, what, deadline, timeout_s)
            finished = True
            return [_parsed(line, j, what) for j, line in enumerate(lines)]
        finally:
            for proc in procs:
                _stop(proc, EXIT_S if finished else 0.0)


def _start(base: Path, layout: Layout, card: ModelCard, config: EmbedConfig, warm: pa.Table, timed: pa.Table,
           err_path: Path) -> subprocess.Popen:  # fmt: skip
    rows = {"warm": f"{base}.warm.parquet", "timed": f"{base}.timed.parquet"}
    pq.write_table(warm, rows["warm"])
    pq.write_table(timed, rows["timed"])
    job = {"root": layout.store.display(layout.store.root), "model": card.name, "version": card.version,
           "config": dataclasses.asdict(config), **rows}  # fmt: skip
    Path(f"{base}.json").write_text(json.dumps(job))
    with err_path.open("wb") as err:  # a file, not a pipe: a slot's stderr can never fill up and stall it
        return subprocess.Popen([sys.executable, "-c", SLOT, str(ROOT), f"{base}.json"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)  # fmt: skip


def _release(procs: list[subprocess.Popen], last: bool) -> None:
    for proc in procs:
        try:
            proc.stdin.write(f"{GO}\n".encode())
            proc.stdin.flush()
            if last:
                proc.stdin.close()
        except BrokenPipeError:  # it died after it said it was there: _collect names it with its stderr
            pass


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """Let a slot that is done exit by itself within `grace_s` (its stdout reaches its end), else kill it; reap."""
    if proc.stdin and not proc.stdin.closed:
        try:
            proc.stdin.close()  # a slot still waiting for GO reads its end and stops
        except BrokenPipeError:
            pass
    deadline = time.monotonic() + grace_s
    with selectors.DefaultSelector() as selector:  # no Popen.wait(timeout): it polls with sleeps
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and selector.select(timeout=max(0.0, deadline - time.monotonic())):
            if not os.read(proc.stdout.fileno(), 1 << 16):
                break
        else:
            proc.kill()
    proc.wait()
    proc.stdout.close()


def _collect(procs: list[subprocess.Popen], errs: list[Path], word: str, what: str, deadline: float,
             timeout_s: float) -> list[str]:  # fmt: skip
    """The rest of the line after `word` from every slot's stdout, in slot order; a slot gone or late raises."""
    got: dict[int, str] = {}
    buffers = {j: b"" for j in range(len(procs))}
    with selectors.DefaultSelector() as selector:
        for j, proc in enumerate(procs):
            selector.register(proc.stdout, selectors.EVENT_READ, j)
        while len(got) < len(procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigError(
                    f"{what}: {len(procs) - len(got)} of {len(procs)} slots had not {DONE[word]} after "
                    f"{timeout_s:.0f} s, and were stopped; on a slower machine plan on a smaller sample "
                    "(`backfill plan --images`, the backfill_plan asset's sample_images)"
                )
            for key, _ in selector.select(timeout=min(left, 1.0)):
                j = key.data
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:  # its stdout closed before it said `word`: it died
                    code = procs[j].wait()
                    raise ConfigError(f"{what}: slot {j} exited with {code} before it had {DONE[word]}: "
                                      f"{_stderr_tail(errs[j])}")  # fmt: skip
                buffers[j] += chunk
                while b"\n" in buffers[j] and j not in got:
                    line, buffers[j] = buffers[j].split(b"\n", 1)
                    head, _, rest = line.decode(errors="replace").partition(" ")
                    if head == word:
                        got[j] = rest
                        selector.unregister(key.fileobj)
    return [got[j] for j in range(len(procs))]


def _parsed(line: str, j: int, what: str) -> SlotResult:
    try:
        return SlotResult(**json.loads(line))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: slot {j} sent a result that does not parse ({exc}): {line[:200]!r}") from None


def _stderr_tail(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-STDERR_LINES:]) if lines else "nothing on its stderr (killed? out of memory?)"


def _main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    layout = Layout(Store.open(job["root"]))
    card, config = read_card(layout, job["model"], job["version"]), EmbedConfig(**job["config"])

    def release(word: str) -> None:
        print(word, flush=True)
        if sys.stdin.readline().strip() != GO:  # the caller gave up (its deadline, another slot's failure)
            raise SystemExit(f"calibration slot: stopped by the caller after it had {DONE[word]}")

    result = embed_slot(layout, card, config, pq.read_table(job["warm"]), pq.read_table(job["timed"]), release)
    print(RESULT, json.dumps(dataclasses.asdict(result)), flush=True)
