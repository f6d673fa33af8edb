"""A user's path for their own images: JPEGs as a folder and as a WebDataset tar -> `backfill ingest` ->
`backfill register` -> the backfill through the real daemon -> `backfill search`. Prints each command's output.

    .venv/bin/python scripts/ingest_demo.py [--images 500] [--workdir /tmp/ingest-demo]
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backfill.embed import MARKER  # noqa: E402
from backfill.manifest import list_shards  # noqa: E402
from backfill.publish import read_pointer  # noqa: E402
from backfill.sample import SampleSpec, make_sample_corpus  # noqa: E402
from backfill.settings import DEFAULT_MODEL  # noqa: E402
from backfill.storage import Layout, Store  # noqa: E402
from harness.local_instance import new_instance, start_daemon, stop  # noqa: E402

TIMEOUT_S = 600


def backfill(env: dict[str, str], *args: str) -> str:
    """Run the `backfill` command of this checkout, echoing the command line and its output."""
    print(f"\n$ backfill {' '.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "backfill.cli", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    print((done.stderr + done.stdout).rstrip(), flush=True)
    if done.returncode:
        raise SystemExit(f"backfill {args[0]} exited {done.returncode}")
    return done.stdout


def make_photos(work: Path, images: int) -> tuple[Path, Path]:
    """`images` JPEGs from the project's sample generator, as a folder and as one WebDataset tar."""
    scratch = Layout(Store.open(str(work / "generated")))
    make_sample_corpus(scratch, SampleSpec(images=images, shards=1))
    photos = work / "photos"
    shutil.copytree(scratch.images, photos)
    with tarfile.open(work / "photos.tar", "w") as tar:  # WebDataset: <key>.jpg with <key>.json beside it
        for path in sorted(photos.rglob("*.jpg")):
            key = str(path.relative_to(photos).with_suffix(""))
            tar.add(path, arcname=key + ".jpg")
            meta = f'{{"file": "{path.name}"}}'.encode()
            info = tarfile.TarInfo(key + ".json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    shutil.rmtree(work / "generated")
    return photos, work / "photos.tar"


def wait_published(layout: Layout, version: str, daemon, log: Path) -> float:
    started = time.monotonic()
    shards = list_shards(layout)
    while True:
        pointer = read_pointer(layout, DEFAULT_MODEL)
        if pointer and pointer["version"] == version:
            return time.monotonic() - started
        if daemon.poll() is not None:
            raise SystemExit(f"dagster-daemon exited (code {daemon.returncode}); see {log}")
        if time.monotonic() - started > TIMEOUT_S:
            done = sum(layout.store.exists(f"{layout.embeddings(DEFAULT_MODEL, version, s)}/{MARKER}") for s in shards)
            raise SystemExit(f"{version} not published in {TIMEOUT_S}s ({done}/{len(shards)} shards); see {log}")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workdir", default="/tmp/ingest-demo")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    photos, tar = make_photos(work, args.images)
    print(f"{args.images} JPEGs in {photos}, and as {tar} ({tar.stat().st_size / 1e6:.1f} MB, a .json per image)")
    root = work / "root"
    env = new_instance(work / "dagster_home", root, interval_s=5)
    layout = Layout(Store.open(str(root)))
    shard_size = str(max(1, args.images // 2))
    backfill(env, "--root", str(root), "ingest", str(photos), "--shard-size", shard_size)
    backfill(env, "--root", str(root), "ingest", str(tar), "--shard-size", shard_size, "--prefix", "wds")
    backfill(env, "--root", str(root), "ingest", str(tar), "--shard-size", shard_size, "--prefix", "wds")  # again
    log = work / "daemon.log"
    daemon = start_daemon(env, log)
    try:
        backfill(env, "--root", str(root), "register", "v1")
        print(f"\n(waiting for the daemon's backfill of {len(list_shards(layout))} shards and the publish)", flush=True)
        took = wait_published(layout, "v1", daemon, log)
        print(f"v1 published {took:.0f}s after registering", flush=True)
    finally:
        stop(daemon)
    query = sorted(photos.rglob("*.jpg"))[7]
    backfill(env, "--root", str(root), "search", str(query), "-k", "4")
    backfill(env, "--root", str(root), "rejects", "v1")
    print(f"\ndone in {time.monotonic() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
