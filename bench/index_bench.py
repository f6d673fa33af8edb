"""Index build at scale: the partitioned build (plan, train, add per shard, merge, tune nprobe) against autofaiss,
on the same vectors and queries, in one run. Prints a table; not a test.

    .venv/bin/python bench/index_bench.py --n 1000000 --dim 256 --parts 8 --budget-mib 2048
    .venv/bin/python bench/index_bench.py --sample-corpus 2400      # real embeddings of the sample corpus

autofaiss pins numpy<2, which this project's pyarrow and faiss do not accept, so it lives in its own venv:
    python3 -m venv .venv-autofaiss && .venv-autofaiss/bin/pip install autofaiss faiss-cpu 'pyarrow<17'
and runs in a subprocess (--autofaiss-python); without it the autofaiss rows read "not installed".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backfill.index_build import (  # noqa: E402
    drop_self,
    sample_queries,
    add_part,
    exact_neighbours,
    merge_parts,
    plan_index,
    recall,
    train_empty,
    tune_nprobe,
)

AUTOFAISS = """
import json, sys, time
from autofaiss import build_index
folder, index_path, infos_path, budget, cores = sys.argv[1:6]
began = time.perf_counter()
index, infos = build_index(embeddings=folder, index_path=index_path, index_infos_path=infos_path, max_index_memory_usage=budget,
                           current_memory_available="12G", nb_cores=int(cores), metric_type="ip", min_nearest_neighbors_to_retrieve=10,
                           verbose=30)
print(json.dumps({"build_s": time.perf_counter() - began, "infos": infos}))
"""


def clustered(n: int, dim: int, clusters: int, seed: int = 0, chunk: int = 200_000) -> np.ndarray:
    """Unit vectors around `clusters` random centres (generated in chunks: 1M x 256 is 1 GiB)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[rng.integers(0, clusters, e - s)] + 0.5 * rng.standard_normal((e - s, dim)).astype(np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def sample_corpus_vectors(images: int) -> np.ndarray:
    """Real embeddings: the synthetic sample corpus embedded by reference model v2."""
    from backfill.config import EmbedConfig
    from backfill.embed import embed_shard, load_embeddings
    from backfill.manifest import list_shards
    from backfill.models import REFERENCE, torchscript_bytes
    from backfill.registry import register_version
    from backfill.runtime import load_model
    from backfill.sample import SampleSpec, make_sample_corpus
    from backfill.storage import Layout, Store

    root = tempfile.mkdtemp(prefix="index-bench-corpus-")
    try:
        layout = Layout(Store.open(root))
        make_sample_corpus(layout, SampleSpec(images=images, shards=4))
        arch = REFERENCE["v2"]
        card = register_version(layout, "refcnn", "v2", torchscript_bytes(arch), dim=arch.dim, input_size=arch.input_size)
        model = load_model(layout, card)
        parts = []
        for shard in list_shards(layout):
            embed_shard(layout, shard, model, EmbedConfig())
            _, vectors, valid = load_embeddings(layout, "refcnn", "v2", shard)
            parts.append(vectors[valid])
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def latency(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float]:
    """(ms per query in one batch of all queries, p50 ms of single-query searches)."""
    began = time.perf_counter()
    index.search(queries, k)
    batch_ms = 1000 * (time.perf_counter() - began) / len(queries)
    singles = []
    for q in queries[:200]:
        began = time.perf_counter()
        index.search(q[None, :], k)
        singles.append(1000 * (time.perf_counter() - began))
    return batch_ms, float(np.median(singles))


def ours(x: np.ndarray, parts_n: int, budget: int, workers: int, queries, qids, truth, target: float, k: int) -> dict:
    n, dim = x.shape
    ids = np.arange(n, dtype=np.int64)
    bounds = np.linspace(0, n, parts_n + 1).astype(int)
    parts = [(ids[a:b], x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    t0 = time.perf_counter()
    plan = plan_index(n, dim, budget)
    rng = np.random.default_rng(0)
    sample = x[np.sort(rng.choice(n, plan.train_size, replace=False))] if plan.train_size else x[:1]
    trained = train_empty(sample, plan, dim)
    t1 = time.perf_counter()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads // workers))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        blobs = list(pool.map(lambda p: add_part(trained, *p), parts))
    faiss.omp_set_num_threads(threads)
    t2 = time.perf_counter()
    index = merge_parts(trained, blobs)
    t3 = time.perf_counter()
    tuning = tune_nprobe(index, queries, truth, target, exclude=qids)
    t4 = time.perf_counter()
    if faiss.try_extract_index_ivf(index):
        faiss.extract_index_ivf(index).nprobe = tuning.nprobe
    batch_ms, single_ms = latency(index, queries, k)
    return {
        "index": plan.factory,
        "build_s": t3 - t0,
        "detail": f"train {t1 - t0:.1f}s (sample {plan.train_size}), add {parts_n} parts {t2 - t1:.1f}s, merge {t3 - t2:.1f}s; tune {t4 - t3:.1f}s",
        "nprobe": tuning.nprobe,
        "recall": tuning.recall,
        "by_nprobe": tuning.recall_by_nprobe,
        "batch_ms": batch_ms,
        "single_ms": single_ms,
        "bytes": faiss.serialize_index(index).size,
        "plan": plan.reason,
    }


def autofaiss(python: str, x: np.ndarray, budget: int, cores: int, queries, qids, truth, target: float, k: int) -> dict | str:
    if not python or not os.path.exists(python):
        return "not installed"
    work = tempfile.mkdtemp(prefix="autofaiss-")
    try:
        os.makedirs(f"{work}/emb")
        np.save(f"{work}/emb/part.npy", x)
        proc = subprocess.run(
            [python, "-c", AUTOFAISS, f"{work}/emb", f"{work}/knn.index", f"{work}/infos.json", f"{budget // 2**20}M", str(cores)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        index = faiss.read_index(f"{work}/knn.index")
        params = result["infos"].get("index_param", "")
        faiss.ParameterSpace().set_index_parameters(index, params)
        _, found = index.search(queries, k + 1)
        own = recall(drop_self(found, qids, k), truth)
        ivf = faiss.try_extract_index_ivf(index)
        own_nprobe = ivf.nprobe if ivf else 0
        tuning = tune_nprobe(index, queries, truth, target, exclude=qids)
        if ivf:
            ivf.nprobe = tuning.nprobe
        batch_ms, single_ms = latency(index, queries, k)
        return {
            "index": result["infos"].get("index_key", "?"),
            "build_s": result["build_s"],
            "detail": f"its own params {params}: recall {own:.3f} at nprobe {own_nprobe}",
            "nprobe": tuning.nprobe,
            "recall": tuning.recall,
            "by_nprobe": tuning.recall_by_nprobe,
            "batch_ms": batch_ms,
            "single_ms": single_ms,
            "bytes": os.path.getsize(f"{work}/knn.index"),
            "plan": "autofaiss defaults: max_index_query_time_ms=10, memory budget as ours",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--sample-corpus", type=int, default=0, help="instead of clustered vectors: embed a sample corpus of this many images")
    p.add_argument("--parts", type=int, default=8, help="shards the build adds in parallel, then merges")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget-mib", type=int, default=2048, help="memory budget of the filled index")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--autofaiss-python", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-autofaiss/bin/python"))
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    args = p.parse_args(argv)
    k = 10
    cores = faiss.omp_get_max_threads()
    began = time.perf_counter()
    if args.sample_corpus:
        x, source = sample_corpus_vectors(args.sample_corpus), f"sample corpus ({args.sample_corpus} images, refcnn v2)"
    else:
        x, source = clustered(args.n, args.dim, args.clusters), f"clustered ({args.clusters} centres)"
    print(f"[{time.strftime('%H:%M:%S')}] {len(x)} x {x.shape[1]} vectors, {source}, in {time.perf_counter() - began:.1f}s", file=sys.stderr)
    ids = np.arange(len(x), dtype=np.int64)
    queries, qids = sample_queries([(ids, x)], args.queries, np.random.default_rng(42))
    truth = drop_self(exact_neighbours([(ids, x)], queries, k + 1), qids, k)
    budget = args.budget_mib * 2**20
    rows = {"ours (sharded)": ours(x, args.parts, budget, args.workers, queries, qids, truth, args.target, k)}
    print(f"[{time.strftime('%H:%M:%S')}] ours done", file=sys.stderr)
    rows["autofaiss"] = autofaiss(args.autofaiss_python, x, budget, cores, queries, qids, truth, args.target, k)
    head = f"vectors={len(x)} dim={x.shape[1]} source={source} budget={args.budget_mib}MiB cores={cores} load={os.getloadavg()[0]:.2f} queries={len(queries)} k={k} target={args.target}"
    lines = [head, f"{'build':16} {'index':22} {'build s':>8} {'nprobe':>6} {'recall@10':>9} {'ms/q batch':>10} {'ms/q single':>11} {'MiB':>7}  detail", "-" * 130]
    for name, r in rows.items():
        if isinstance(r, str):
            lines.append(f"{name:16} {r}")
            continue
        lines.append(
            f"{name:16} {r['index']:22} {r['build_s']:8.2f} {r['nprobe']:6d} {r['recall']:9.3f} {r['batch_ms']:10.3f} {r['single_ms']:11.3f} {r['bytes'] / 2**20:7.0f}  {r['detail']}"
        )
    for name, r in rows.items():
        if not isinstance(r, str):
            lines.append(f"  {name} recall by nprobe: " + ", ".join(f"{p}:{v:.3f}" for p, v in r["by_nprobe"].items()) + f"  [{r['plan']}]")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(f"{args.out}/index_bench_{len(x)}x{x.shape[1]}.txt", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
