"""Index build at scale: the budgeted build step by step (each step its own process: its peak RSS is its
own), and today's in-memory build (git ref --old) against the new one end to end, on synthetic embeddings
written in the engine's format. Prints tables; not a test.

    .venv/bin/python bench/index_bench.py --n 1000000 --shards 10 --threads 1 --old 89b604c --compare-only
    .venv/bin/python bench/index_bench.py --n 10000000 --shards 100 --threads 1 --max-nlist 4096 --old ''
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import faiss
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from backfill.config import IndexConfig  # noqa: E402 (after the sys.path line)
from backfill.index import IDS_FILE, build_index  # noqa: E402
from backfill.index_build import (  # noqa: E402
    BlockReader,
    BuildWork,
    add_part,
    load_queries,
    merge_parts,
    part_truth,
    prepare,
    train,
    trained_index,
)
from backfill.index_quality import drop_self, merge_results, tune_nprobe  # noqa: E402
from backfill.storage import Layout, Store  # noqa: E402
from bench.synthetic import clustered, write_embedded_shard  # noqa: E402

MODEL, VERSION = "synthetic", "v1"
STEPS = ("scan", "train", "add", "merge", "ground_truth", "tune")


def shard_names(shards: int) -> list[str]:
    return [f"shard-{i:05d}" for i in range(shards)]


def write_corpus(layout: Layout, n: int, dim: int, shards: int, chunk_rows: int) -> dict:
    """n clustered vectors (n/1000 centres, 16-d intrinsic spread) as `shards` embedded shards, one at a time."""
    per = n // shards
    for i, name in enumerate(shard_names(shards)):
        x = clustered(per, dim, max(1000, n // 1000), seed=i + 1, intrinsic=16, centre_seed=0)
        ids = np.arange(i * per, (i + 1) * per, dtype=np.int64) * 2 + 7  # image ids, not positions
        write_embedded_shard(layout, MODEL, VERSION, name, ids, x, chunk_rows)
    return {"vectors": per * shards}


def run_step(step: str, args: argparse.Namespace) -> dict:
    """One step in this process; returns its result and the process's own peak RSS."""
    faiss.omp_set_num_threads(args.threads)
    layout = Layout(Store.open(args.root))
    config = IndexConfig(memory_budget_mb=args.budget_mb, max_nlist=args.max_nlist)
    state = os.path.join(args.root, "bench-state")
    began = time.perf_counter()
    out: dict = {}
    if step == "write":
        out = write_corpus(layout, args.n, args.dim, args.shards, args.chunk_rows)
    elif step == "scan":
        os.makedirs(state, exist_ok=True)
        work = prepare(layout, MODEL, VERSION, shard_names(args.shards), config, os.path.join(state, IDS_FILE))
        with open(os.path.join(state, "work"), "w") as f:
            f.write(work.folder)
        out = {"plan": work.plan.factory, "reason": work.plan.reason, "train_size": work.plan.train_size}
    elif step in ("new", "old"):
        shutil.rmtree(layout.store.url("indexes", MODEL, "work"), ignore_errors=True)  # no parts from the steps above
        build = (build_index if step == "new" else old_build_index(args.old))(
            layout, MODEL, VERSION, shard_names(args.shards), config
        )
        out = {
            "index": build.index_type,
            "recall": build.recall_at_k,
            "nprobe": build.nprobe,
            "bytes": build.index_bytes,
            "steps": getattr(build, "steps", {}),  # the budgeted build records seconds per step; today's does not
        }
    else:
        out = _budgeted_step(step, layout, state, args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update(
        step=step,
        s=round(time.perf_counter() - began, 2),
        # CPU seconds of the process (imports included): on a shared machine less noisy than wall seconds
        cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
        rss_mib=usage.ru_maxrss / 1024,
    )
    return out


def _budgeted_step(step: str, layout: Layout, state: str, args: argparse.Namespace) -> dict:
    with open(os.path.join(state, "work")) as f:
        work = BuildWork.load(layout, f.read())
    reader = BlockReader(layout, MODEL, VERSION, work.plan.block_rows)
    merged = os.path.join(state, "merged.faiss")
    k = work.k
    if step == "train":
        train(layout, work, reader)
    elif step == "add":
        built = sum(add_part(layout, work, s.name, reader) for s in work.spans)
        # includes each shard's exact search of the held-out queries (the ground truth's heavy half)
        return {"parts_built": built, "largest_block": reader.largest_block}
    elif step == "merge":
        lists = os.path.join(state, "lists.ivfdata") if work.plan.ondisk else None
        index = merge_parts(trained_index(layout, work), [work.part(s.name) for s in work.spans], layout.store, lists)
        faiss.write_index(index, merged)
        return {"bytes": os.path.getsize(merged) + (os.path.getsize(lists) if lists else 0), "ntotal": index.ntotal}
    elif step == "ground_truth":
        own, _ = load_queries(layout, work)
        found = merge_results((part_truth(layout, work, s.name) for s in work.spans), len(own), k + 1)
        np.save(os.path.join(state, "truth.npy"), drop_self(found, own, k))
        return {"queries": len(own)}
    elif step == "tune":
        own, queries = load_queries(layout, work)
        tuning = tune_nprobe(
            faiss.read_index(merged), queries, np.load(os.path.join(state, "truth.npy")), work.config.target_recall, own
        )
        return {"nprobe": tuning.nprobe, "recall": tuning.recall, "by_nprobe": tuning.recall_by_nprobe}
    return {}


def old_build_index(ref: str):
    """build_index as it is at git `ref` (today's in-memory build), loaded from git without checking it out.

    A name it imports from backfill.* that the current tree no longer has (find_cross_shard_duplicates,
    since the bounded id check) is taken from the same module at `ref`."""
    source = _git_show(ref, "backfill/index.py")
    spec = importlib.util.spec_from_loader("old_index", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_index"] = module  # dataclasses look their module up
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("backfill."):
            current = importlib.import_module(node.module)
            gone = [a.name for a in node.names if not hasattr(current, a.name)]
            node.names = [a for a in node.names if a.name not in gone]
            if gone:
                old = ast.parse(_git_show(ref, node.module.replace(".", "/") + ".py"))
                defs = [d for d in old.body if isinstance(d, ast.FunctionDef) and d.name in gone]
                module.__dict__["np"] = np
                # our own repository's code at another commit, run to compare against it
                exec(compile(ast.Module(defs, []), f"{ref}:{node.module}", "exec"), module.__dict__)  # noqa: S102
    tree.body = [n for n in tree.body if not (isinstance(n, ast.ImportFrom) and not n.names)]
    exec(compile(tree, f"{ref}:backfill/index.py", "exec"), module.__dict__)  # noqa: S102
    return module.build_index


def _git_show(ref: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", REPO, "show", f"{ref}:{path}"], capture_output=True, text=True, check=True
    ).stdout


def in_subprocess(step: str, argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--step", step], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[{time.strftime('%H:%M:%S')}] {step}: {result}", file=sys.stderr, flush=True)
    return result


def table(args: argparse.Namespace, rows: list[dict], compare: list[dict]) -> str:
    by = {r["step"]: r for r in rows}
    tune, merge, scan = by.get("tune", {}), by.get("merge", {}), by.get("scan", {})
    lines = [
        (
            f"vectors={args.n} dim={args.dim} shards={args.shards} chunk_rows={args.chunk_rows} "
            f"budget={args.budget_mb}MiB max_nlist={args.max_nlist} faiss_threads={args.threads} "
            f"cores={os.cpu_count()} load={os.getloadavg()[0]:.2f}"
        ),
        f"plan: {scan.get('plan')} ({scan.get('reason')}; train sample {scan.get('train_size')})",
        f"{'step':14} {'seconds':>8} {'peak RSS MiB':>12} {'within budget':>13}  detail",
        "-" * 90,
    ]
    for r in rows:
        detail = {k: v for k, v in r.items() if k not in ("step", "s", "cpu_s", "rss_mib", "by_nprobe", "reason")}
        within = "yes" if r["rss_mib"] <= args.budget_mb else "NO"
        lines.append(f"{r['step']:14} {r['s']:8.1f} {r['rss_mib']:12.0f} {within:>13}  {json.dumps(detail)}")
    if tune:
        lines.append(
            f"recall@10={tune['recall']:.4f} at nprobe={tune['nprobe']}; index bytes={merge.get('bytes')}; "
            f"by nprobe {tune['by_nprobe']}"
        )
    if compare:
        lines += [
            "",
            f"{'end to end':14} {'seconds':>8} {'CPU s':>7} {'peak RSS MiB':>12}  {'index':16} {'recall@10':>9} "
            f"{'nprobe':>6}",
            "-" * 78,
        ]
        for r in compare:
            lines.append(
                f"{r['step']:14} {r['s']:8.1f} {r.get('cpu_s', 0):7.1f} {r['rss_mib']:12.0f}  "
                f"{r['index']:16} {r['recall']:9.4f} {r['nprobe']:6d}  {json.dumps(r['steps']) if r['steps'] else ''}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per committed chunk (EmbedConfig.chunk_size)")
    p.add_argument("--budget-mb", type=int, default=4096)
    p.add_argument("--max-nlist", type=int, default=65536)
    p.add_argument("--threads", type=int, default=1, help="FAISS threads per step")
    p.add_argument("--old", default="main", help="git ref of today's build to compare end to end ('' to skip)")
    p.add_argument("--root", default="/tmp/index-bench")
    p.add_argument("--keep", action="store_true", help="keep the synthetic corpus afterwards")
    p.add_argument("--compare-only", action="store_true", help="only the end-to-end builds, new first, then --old")
    p.add_argument("--step", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args(argv)
    if args.step:
        print(json.dumps(run_step(args.step, args)))
        return 0
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    shutil.rmtree(args.root, ignore_errors=True)
    write = in_subprocess("write", passed)
    rows = [] if args.compare_only else [in_subprocess(step, passed) for step in STEPS]
    order = ["new", "old"] if args.compare_only else ["old", "new"]  # either goes first with a cold page cache
    compare = [in_subprocess(step, passed) for step in (order if args.old else [])]
    text = f"corpus written in {write['s']:.0f}s (peak RSS {write['rss_mib']:.0f} MiB)\n" + table(args, rows, compare)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(f"{args.out}/index_bench_{args.n}x{args.dim}.txt", "w") as f:
            f.write(text + "\n")
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
