"""The whole loop on the local default: sample corpus, v1 through the real daemon, search, then v2 and the swap."""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backfill.embed import MARKER  # noqa: E402
from backfill.evaluate import near_duplicate_recall  # noqa: E402
from backfill.manifest import list_shards  # noqa: E402
from backfill.models import REFERENCE, export_artifact  # noqa: E402
from backfill.publish import read_pointer  # noqa: E402
from backfill.registry import register_version  # noqa: E402
from backfill.sample import SampleSpec, make_sample_corpus  # noqa: E402
from backfill.search import Searcher  # noqa: E402
from backfill.settings import DEFAULT_MODEL  # noqa: E402
from backfill.storage import Layout, Store  # noqa: E402
from harness.local_instance import init_instance, reset_dagster_home, start_daemon, stop  # noqa: E402

MODEL = DEFAULT_MODEL
TIMEOUT_S = 600


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def wait_published(layout: Layout, version: str, daemon, log: Path) -> float:
    """Wait until CURRENT names `version`, showing shards as their partitions complete."""
    started = time.monotonic()
    shards = list_shards(layout)
    with tqdm(
        total=len(shards), desc=f"{version} shards embedded", unit="shard", file=sys.stdout, mininterval=5
    ) as bar:
        while True:
            done = sum(layout.store.exists(f"{layout.embeddings(MODEL, version, s)}/{MARKER}") for s in shards)
            bar.update(done - bar.n)
            pointer = read_pointer(layout, MODEL)
            if pointer and pointer["version"] == version:
                return time.monotonic() - started
            if daemon.poll() is not None:
                raise SystemExit(f"dagster-daemon exited (code {daemon.returncode}); see {log}")
            if time.monotonic() - started > TIMEOUT_S:
                raise SystemExit(f"{version} was not published within {TIMEOUT_S}s; see {log} and `dagster dev`")
            time.sleep(1)


def near_duplicate_query(layout: Layout) -> tuple[bytes, int, dict[int, tuple[int, str]]]:
    """A transformed copy from a group of >= 4 images, and every image's (group, transform)."""
    info: dict[int, tuple[int, str]] = {}
    for shard in list_shards(layout):
        t = pq.read_table(io.BytesIO(layout.store.read_bytes(layout.manifest(shard))))
        for image_id, uri, group, transform in zip(
            *(t.column(c).to_pylist() for c in ("image_id", "uri", "group_id", "transform"))
        ):
            info[image_id] = (group, transform, uri)
    sizes: dict[int, int] = {}
    for group, _, _ in info.values():
        sizes[group] = sizes.get(group, 0) + 1
    query_id = next(i for i, (g, t, _) in sorted(info.items()) if sizes[g] >= 4 and t == "crop")
    with open(info[query_id][2], "rb") as f:
        data = f.read()
    return data, query_id, info


def show_search(layout: Layout, version: str) -> None:
    data, query_id, info = near_duplicate_query(layout)
    group = info[query_id][0]
    result = Searcher(layout, MODEL).search_image(data, k=10)
    members = [i for i, (g, _, _) in info.items() if g == group and i != query_id]
    print(f"query: image {query_id} (a crop of group {group}, which has {len(members)} other members)")
    print(f"answered by {result.model} {result.version}, index build {result.build_id}")
    print(f"  {'rank':>4} {'score':>7} {'image_id':>8}  {'group':>5}  transform  same group")
    for rank, hit in enumerate(result.hits, 1):
        g, t, _ = info[hit.image_id]
        print(f"  {rank:>4} {hit.score:7.4f} {hit.image_id:>8}  {g:>5}  {t:<9}  {'yes' if g == group else ''}")
    found = sum(info[h.image_id][0] == group and h.image_id != query_id for h in result.hits)
    print(f"found {found} of the {len(members)} other members of the query's group in the top 10")


def register_demo_version(layout: Layout, version: str):
    """v1: the shipped small CNN (random weights, squashed input as before the contract); v2: the pretrained
    EfficientNet-Lite0 with its declared preprocessing (shorter side, centre crop), a real upgrade. Both
    are torch.export (.pt2) artifacts."""
    if version == "v2":
        from backfill.efficientnet import reference_artifact

        blob, dim, preprocess = reference_artifact()  # needs the `models` extra that scripts/setup.sh installs
        return register_version(layout, MODEL, version, blob, dim=dim, preprocess=preprocess, format="torch.export")
    arch = REFERENCE[version]
    blob = export_artifact(arch)
    return register_version(
        layout, MODEL, version, blob, dim=arch.dim, input_size=arch.input_size, format="torch.export"
    )


def show_backfills() -> None:
    import statistics

    from dagster import AssetKey, DagsterInstance

    instance = DagsterInstance.get()
    for backfill in sorted(instance.get_backfills(), key=lambda b: b.backfill_timestamp):
        target = backfill.asset_backfill_data.target_subset if backfill.asset_backfill_data else None
        size = target.num_partitions_and_non_partitioned_assets if target else "?"
        print(f"backfill {backfill.backfill_id}: {backfill.status.value}, {size} partitions of image_embeddings")
    per_version: dict[str, list[tuple[float, float]]] = {}
    for record in instance.fetch_materializations(AssetKey("image_embeddings"), limit=1000).records:
        m = record.asset_materialization
        per_version.setdefault(m.partition.split("|")[0], []).append(
            (m.metadata["images_per_s"].value, m.metadata["wall_s"].value)
        )
    for version, rows in sorted(per_version.items()):
        rates, walls = [r for r, _ in rows], [w for _, w in rows]
        print(
            f"{version}: {len(rows)} partitions, images/s per partition median {statistics.median(rates):.0f} "
            f"(min {min(rates):.0f}, max {max(rates):.0f}), "
            f"embedding wall per partition median {statistics.median(walls):.2f}s"
        )


def main() -> None:
    warnings.filterwarnings("ignore")
    t0 = time.monotonic()
    root, home = REPO / "data", REPO / "dagster_home"
    shutil.rmtree(root, ignore_errors=True)
    reset_dagster_home(home)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "BACKFILL_ROOT": str(root),
        # the demo polls faster than the defaults (30 s) so that it finishes in minutes
        "BACKFILL_SENSOR_INTERVAL": "5",
        "BACKFILL_AUTOMATION_INTERVAL": "5",
    }
    os.environ.update(env)
    layout = Layout(Store.open(str(root)))

    say("sample corpus")
    # 800 images in 4 shards: v2 (EfficientNet-Lite0) embeds ~12 img/s on 2 CPU cores, and every run costs ~20 s
    # of process starts here; 1,200 in 8 shards took the loop 605 s
    spec = SampleSpec(images=800, shards=4)
    with tqdm(total=spec.images, desc="images", unit="img", file=sys.stdout, mininterval=5) as bar:
        made = make_sample_corpus(layout, spec, progress=bar.update)
    print(
        f"{made['images']} JPEGs in {made['groups']} near-duplicate groups, "
        f"{made['shards']} manifest shards under {root}"
    )

    log = home / "daemon.log"
    say(f"starting dagster-daemon (log: {log})")
    init_instance(home)
    daemon = start_daemon(env, log)
    try:
        timings = {}
        for version in ("v1", "v2"):
            before = read_pointer(layout, MODEL)
            say(
                f"registering {MODEL} {version}: the registry sensor adds the partition, "
                "automation launches the backfill"
            )
            card = register_demo_version(layout, version)
            print(f"{version}: {card.format} artifact, dim {card.dim}, preprocessing {card.preprocess.describe()}")
            timings[version] = wait_published(layout, version, daemon, log)
            pointer = read_pointer(layout, MODEL)
            swapped = f"{before['build_id']} -> " if before else ""
            print(
                f"published in {timings[version]:.0f}s: CURRENT {swapped}{pointer['build_id']} "
                f"({pointer['index_type']}, "
                f"nprobe={pointer['nprobe']}, index recall@10 vs exact={pointer['recall_at_k']})"
            )
            say(f"search with {version}")
            show_search(layout, version)
        say("near-duplicate recall@10 on the sample corpus (exact search over each version's embeddings)")
        for version in ("v1", "v2"):
            r = near_duplicate_recall(layout, MODEL, version, list_shards(layout))
            print(f"{version}: recall@10={r['recall_at_10']:.4f} top1={r['top1']:.4f} over {int(r['queries'])} queries")
        say("backfills in the Dagster instance")
        show_backfills()
    finally:
        stop(daemon)
    say(f"done in {time.monotonic() - t0:.0f}s; open the UI with: DAGSTER_HOME={home} .venv/bin/dagster dev")


if __name__ == "__main__":
    main()
