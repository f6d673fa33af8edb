"""calibrate_slots: a calibration's slots as fresh interpreters, started together and released at once."""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from backfill.config import EmbedConfig
from backfill.errors import ConfigError
from backfill.storage import Layout

ROOT = Path(__file__).resolve().parents[1]  # first on a slot's sys.path: `backfill` imports as it does here
# a slot's interpreter: this module's _main, with no __main__ of the caller's re-run (multiprocessing's spawn would)
SLOT = "import sys; sys.path.insert(0, sys.argv[1]); from backfill.calibrate_slots import _main; _main(sys.argv[2])"
READY, GO, RESULT = "ready", "go", "result"


def run_slots(
    layout: Layout, card, config: EmbedConfig, parts: list[tuple[pa.Table, pa.Table]], what: str, timeout_s: float
) -> list[dict]:
    """backfill.calibrate._slot(layout, card, config, warm, timed) for each (warm, timed) of `parts`, each in
    its own interpreter. A slot's job is JSON and Parquet (the root, the version, the settings, its rows): no
    pickle, and the slot reads the version's card and model from the root as a partition would.

    Every slot loads the model and warms up, then says READY on its stdout and waits for GO on its stdin; GO
    goes to all once all are ready, so the timed embeddings run side by side. A slot that exits early is named
    with the last line of its stderr; past `timeout_s` (the whole of it) the slots still going are killed.
    A plain interpreter (SLOT), not multiprocessing: spawn would re-run the caller's unguarded __main__.
    """
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="backfill-slots-") as scratch:
        procs, errs = [], []
        try:
            for j, (warm, timed) in enumerate(parts):
                job = Path(scratch) / f"slot-{j}.json"
                rows = {"warm": f"{job}.warm.parquet", "timed": f"{job}.timed.parquet"}
                pq.write_table(warm, rows["warm"])
                pq.write_table(timed, rows["timed"])
                job.write_text(json.dumps({
                    "root": layout.store.display(layout.store.root), "model": card.name, "version": card.version,
                    "config": dataclasses.asdict(config), **rows,
                }))  # fmt: skip
                errs.append(Path(scratch) / f"slot-{j}.err")
                with errs[-1].open("wb") as err:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-c", SLOT, str(ROOT), str(job)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                    ))  # fmt: skip
            _collect(procs, errs, READY, what, deadline)
            for proc in procs:  # released together: the timed embeddings share the machine as run slots do
                proc.stdin.write(f"{GO}\n".encode())
                proc.stdin.close()
            return [json.loads(line) for line in _collect(procs, errs, RESULT, what, deadline)]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                proc.stdout.close()


def _collect(procs: list[subprocess.Popen], errs: list[Path], word: str, what: str, deadline: float) -> list[str]:
    """The rest of the line after `word` from every slot's stdout, in slot order; a slot gone or late raises."""
    got: dict[int, str] = {}
    buffers = {j: b"" for j in range(len(procs))}
    with selectors.DefaultSelector() as selector:
        for j, proc in enumerate(procs):
            selector.register(proc.stdout, selectors.EVENT_READ, j)
        while len(got) < len(procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigError(f"{what}: {len(procs) - len(got)} of {len(procs)} slots not {word} by the deadline; "
                                  "stopped (a slower machine: plan with fewer --images)")  # fmt: skip
            for key, _ in selector.select(timeout=min(left, 1.0)):
                j = key.data
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:  # the slot's stdout closed before it said `word`: it died
                    selector.unregister(key.fileobj)
                    code = procs[j].wait()
                    raise ConfigError(
                        f"{what}: slot {j} exited with {code} before it was {word}: {_last_line(errs[j])}"
                    )
                buffers[j] += chunk
                while b"\n" in buffers[j] and j not in got:
                    line, buffers[j] = buffers[j].split(b"\n", 1)
                    head, _, rest = line.decode().partition(" ")
                    if head == word:
                        got[j] = rest
                        selector.unregister(key.fileobj)
    return [got[j] for j in range(len(procs))]


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "nothing on its stderr (killed? out of memory?)"


def _main(job_path: str) -> None:
    from backfill.calibrate import _slot  # the slot's work: torch and the engine, imported in this process only
    from backfill.registry import read_card
    from backfill.storage import Store

    job = json.loads(Path(job_path).read_text())
    layout = Layout(Store.open(job["root"]))
    card, config = read_card(layout, job["model"], job["version"]), EmbedConfig(**job["config"])
    warm, timed = pq.read_table(job["warm"]), pq.read_table(job["timed"])

    def release() -> None:
        print(READY, flush=True)
        if sys.stdin.readline().strip() != GO:  # the caller gave up (its deadline, another slot's failure)
            raise SystemExit("calibration slot: stopped before the timed embedding")

    result = _slot(layout, card, config, warm, timed, release=release)
    print(RESULT, json.dumps(result), flush=True)
