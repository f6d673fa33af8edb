"""Embedding throughput, side by side on the same images and model: model-only, decode-only, the compute
limit, embed_shard end to end, a naive loop and Ray Data. Prints a table; not a test.

    .venv/bin/python bench/embed_bench.py --model resnet18 --precision bf16 --images 512 --batch 32
    PYTHONPATH=. python3 bench/embed_bench.py --device cuda --model resnet50 --images 32768 --unique 4096 --batch 256

Needs only torch, numpy, pyarrow, fsspec and pillow (no Dagster, faiss or s3fs); Ray Data and
torchvision are used when installed and reported as "not installed" otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backfill.config import GPU_DECODERS, EmbedConfig  # noqa: E402
from backfill.embed import embed_shard  # noqa: E402
from backfill.errors import ConfigError  # noqa: E402
from backfill.feed import Preprocessor  # noqa: E402
from backfill.images import decode  # noqa: E402
from backfill.manifest import write_shard  # noqa: E402
from backfill.pipeline import cpu_budget  # noqa: E402
from backfill.preprocess import Preprocess  # noqa: E402
from backfill.registry import register_version  # noqa: E402
from backfill.runtime import load_model  # noqa: E402
from backfill.storage import Layout, Store  # noqa: E402

MODELS = {  # name -> (dim, input size)
    "resnet18": (256, 224),
    "resnet50": (256, 224),
    "refcnn-v1": (128, 96),
    "refcnn-v2": (256, 128),
    "efficientnet-lite0": (1280, 224),  # pretrained, .pt2, its own preprocessing (shorter side + centre crop)
}


def artifact(name: str) -> bytes:
    if name.startswith("resnet"):
        from backfill.resnet import torchscript_bytes

        return torchscript_bytes(name, *MODELS[name])
    from backfill.models import REFERENCE
    from backfill.models import torchscript_bytes as ref_bytes

    return ref_bytes(REFERENCE[name.split("-")[1]])


ASPECTS = (4 / 3, 3 / 4, 3 / 2, 2 / 3, 1.0, 16 / 9, 9 / 16)  # width / height of photos, both orientations


def mixed_size(seed: int, side: int) -> tuple[int, int]:
    """A photo-like size around `side`: long side in [0.75, 1.5] x side, a common aspect ratio. Nearly every
    image of such a corpus has a size of its own, as in a real one, so the GPU path resizes them one by one."""
    rng = np.random.default_rng([seed, 7])
    long, aspect = int(side * rng.uniform(0.75, 1.5)), ASPECTS[int(rng.integers(len(ASPECTS)))]
    return (long, max(16, round(long / aspect))) if aspect >= 1 else (max(16, round(long * aspect)), long)


def _jpeg(args: tuple[int, int, int, int]) -> bytes:
    from backfill.sample import synthetic_image

    seed, width, height, quality = args
    img = synthetic_image(np.random.default_rng(seed)).resize((width, height))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_corpus(layout: Layout, images: int, unique: int, side: int, mixed: bool = False) -> list[bytes]:
    """`unique` synthetic side x side JPEGs (of mixed_size sizes if `mixed`) on disk, listed `images` times over
    in one manifest shard."""
    sizes = [mixed_size(i, side) if mixed else (side, side) for i in range(unique)]
    with Pool(min(unique, os.cpu_count() or 1)) as pool:
        blobs = pool.map(_jpeg, [(i, w, h, 90) for i, (w, h) in enumerate(sizes)], chunksize=16)
    uris = []
    for i, blob in enumerate(blobs):
        path = layout.store.url("corpus", "images", f"{i:08d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(blob)
        uris.append(path)
    table = pa.table(
        {
            "image_id": pa.array(np.arange(images), pa.int64()),
            "uri": pa.array([uris[i % unique] for i in range(images)]),
        }
    )
    write_shard(layout, "bench", table)
    return blobs


def timed(fn, *args) -> float:
    began = time.perf_counter()
    fn(*args)
    return time.perf_counter() - began


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_only(model, pixels: torch.Tensor, batch: int, images: int) -> float:
    """Forward passes over preloaded pixels on the device (normalisation and output copy included)."""
    for _ in range(2):  # warm-up: autotuning, TorchScript profiling runs
        model.embed_pixels(pixels[:batch])
    sync(str(model.device))
    began, done = time.perf_counter(), 0
    while done < images:
        start = done % max(1, len(pixels) - batch + 1)
        model.embed_pixels(pixels[start : start + batch])
        done += batch
    sync(str(model.device))
    return done / (time.perf_counter() - began)


def decode_cpu(blobs: list[bytes], size: int | Preprocess, workers: int) -> float:
    began = time.perf_counter()
    if workers == 1:
        for b in blobs:
            decode(b, size, 64_000_000)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda b: decode(b, size, 64_000_000), blobs, chunksize=16))
    return len(blobs) / (time.perf_counter() - began)


def decode_gpu(prep: Preprocessor, blobs: list[bytes], batch: int, images: int) -> float:
    """nvjpeg batched decode + resize to the model input, on the device (header parse included)."""
    items = [prep.stage(b) for b in blobs[: max(batch, min(len(blobs), 4 * batch))]]
    prep.batch(items[:batch])
    sync(str(prep.device))
    began, done = time.perf_counter(), 0
    while done < images:
        start = done % max(1, len(items) - batch + 1)
        prep.batch(items[start : start + batch])
        done += batch
    sync(str(prep.device))
    return done / (time.perf_counter() - began)


def naive(model, uris: list[str], size: int | Preprocess, batch: int, out_dir: str) -> float:
    """Read, decode, infer, write, one batch after the other, in one thread."""
    began = time.perf_counter()
    for b, start in enumerate(range(0, len(uris), batch)):
        pixels = []
        for uri in uris[start : start + batch]:
            with open(uri, "rb") as f:
                pixels.append(decode(f.read(), size, 64_000_000))
        vectors = model.embed(np.stack(pixels))
        pq.write_table(pa.table({"embedding": list(vectors.astype(np.float16))}), f"{out_dir}/naive-{b:06d}.parquet")
    return len(uris) / (time.perf_counter() - began)


def ray_data(root: str, card, device: str, uris: list[str], batch: int, cores: int) -> tuple[float, str]:
    """Ray Data: decode in map_batches tasks, embed in one model actor (map_batches on a callable class)."""
    try:
        import ray
    except ImportError:
        return float("nan"), "not installed"
    size = card.preprocess  # the version's contract, as the engine applies it
    ray.init(
        num_cpus=cores, num_gpus=1 if device.startswith("cuda") else 0, include_dashboard=False, log_to_driver=False
    )
    try:

        def decode_batch(rows: dict) -> dict:
            out = []
            for uri in rows["uri"]:
                with open(uri, "rb") as f:
                    out.append(decode(f.read(), size, 64_000_000))
            return {"pixels": np.stack(out)}

        class Embed:
            def __init__(self) -> None:
                torch.set_num_threads(cores)
                self.model = load_model(Layout(Store.open(root)), card, device)

            def __call__(self, rows: dict) -> dict:
                return {"embedding": self.model.embed(rows["pixels"])}

        gpus = 1 if device.startswith("cuda") else 0
        began = time.perf_counter()
        ds = ray.data.from_items([{"uri": u} for u in uris])
        # different resources keep Ray from fusing decode into the actor: decode runs as parallel tasks
        ds = ds.map_batches(decode_batch, batch_size=batch, num_cpus=0.5)
        ds = ds.map_batches(Embed, batch_size=batch, concurrency=1, num_gpus=gpus, num_cpus=0 if gpus else 1)
        n = 0
        for part in ds.iter_batches(batch_size=None):
            n += len(part["embedding"])
        took = time.perf_counter() - began
        return n / took, f"ray {ray.__version__}, {n} rows, actor start included"
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=512, help="rows in the benchmark shard")
    p.add_argument("--unique", type=int, default=0, help="distinct JPEG files (rows repeat them); 0: one per row")
    p.add_argument("--side", type=int, default=512, help="JPEG width and height")
    p.add_argument(
        "--mixed", action="store_true", help="JPEGs of many sizes (long side 0.75-1.5 x --side, photo aspect ratios)"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads and decode workers; 0: the CPUs of this process"
    )
    p.add_argument("--no-gpu-decode", action="store_true", help="on CUDA: decode with PIL on the CPU cores, not nvjpeg")
    p.add_argument(
        "--prefetch",
        type=int,
        default=EmbedConfig.prefetch_batches,
        help="embed_shard: prepared batches ahead of the model",
    )
    p.add_argument("--fetch-workers", type=int, default=EmbedConfig.fetch_workers, help="embed_shard: fetch threads")
    p.add_argument("--decode-workers", type=int, default=0, help="embed_shard: decode threads (PIL path); 0: --threads")
    p.add_argument(
        "--sweep",
        default="",
        help="extra row d runs after the rounds, ';'-separated settings of prefetch, fetch, decode, batch, "
        "assemble (batch-assembly threads), decoder (torchvision or nvimgcodec: the GPU JPEG decoder), "
        "e.g. 'prefetch=1;fetch=32,prefetch=6;assemble=3;decoder=nvimgcodec,assemble=2'",
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds of rows a-e, interleaved; each row keeps its best")
    p.add_argument("--skip", default="", help="comma list of rows to skip: naive,ray")
    p.add_argument("--root", default="", help="work folder (default: a temporary one, removed after)")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for the table and JSON (default: $OUT)")
    args = p.parse_args(argv)

    cores = args.threads or cpu_budget()
    torch.set_num_threads(cores)
    unique = args.unique or args.images
    skip = set(filter(None, args.skip.split(",")))
    root = args.root or tempfile.mkdtemp(prefix="embed-bench-")
    layout = Layout(Store.open(root))
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        shape = f"many sizes around {args.side}" if args.mixed else f"{args.side}x{args.side}"
        log(f"writing {unique} JPEGs of {shape}, {args.images} rows")
        blobs = make_corpus(layout, args.images, unique, args.side, args.mixed)
        uris = [layout.store.url("corpus", "images", f"{i % unique:08d}.jpg") for i in range(args.images)]
        dim, size = MODELS[args.model]
        began = time.perf_counter()
        if args.model == "efficientnet-lite0":
            from backfill.efficientnet import reference_artifact

            blob, dim, size = reference_artifact()  # size: its Preprocess, which decode and the feeder take
            card = register_version(
                layout,
                args.model,
                "bench",
                blob,
                dim=dim,
                preprocess=size,
                format="torch.export",
                extra={"precision": args.precision},
            )
        else:
            card = register_version(
                layout,
                args.model,
                "bench",
                artifact(args.model),
                dim=dim,
                input_size=size,
                extra={"precision": args.precision},
            )
        register_s = time.perf_counter() - began
        began = time.perf_counter()
        model = load_model(layout, card, args.device)
        load_s = time.perf_counter() - began
        log(f"registered in {register_s:.1f}s (precision check), loaded in {load_s:.1f}s; autocast={model.autocast}")

        rows: dict[str, tuple[float, str]] = {}
        sample = blobs[: min(len(blobs), 1024)]
        pixels = torch.from_numpy(np.stack([decode(b, size, 64_000_000) for b in sample[: max(args.batch, 256)]]))
        pixels = pixels.permute(0, 3, 1, 2).to(args.device)
        work = max(args.images, 4 * args.batch)
        cuda = args.device.startswith("cuda")
        prep = Preprocessor(size, 64_000_000, args.device, gpu_decode=not args.no_gpu_decode)
        nv_prep, no_nv = None, "not on CUDA"  # nvImageCodec's batched decode beside nvjpeg's, where it works
        if cuda and not args.no_gpu_decode:
            try:
                nv_prep = Preprocessor(size, 64_000_000, args.device, gpu_decoder="nvimgcodec")
            except ConfigError as exc:  # not installed, or no nvjpeg codec: its rows say so, the rest still run
                no_nv = str(exc)
                log(f"no nvimgcodec rows: {exc}")

        def embed_config(
            prefetch: int, fetch: int, decode_workers: int, batch: int, assemble: int = 1, decoder: str = "torchvision"
        ) -> EmbedConfig:
            return EmbedConfig(
                batch_size=batch,
                chunk_size=max(1024, batch),
                device=args.device,
                torch_threads=cores,
                fetch_workers=fetch,
                decode_workers=decode_workers,
                gpu_decode=not args.no_gpu_decode,
                prefetch_batches=prefetch,
                assembly_workers=assemble,
                gpu_decoder=decoder,
            )

        config = embed_config(args.prefetch, args.fetch_workers, args.decode_workers or cores, args.batch)
        out_dir = tempfile.mkdtemp(dir=root)
        naive_n = min(args.images, max(4 * args.batch, 2048)) if cuda else args.images

        def best(name: str, rate: float, note: str) -> None:
            # the best of the rounds: the others were slowed by something other than this code
            if name not in rows or not rate <= rows[name][0]:
                rows[name] = (rate, note + (f", best of {args.repeat}" if args.repeat > 1 else ""))
            save(rows)  # each row as it is measured: a step stopped mid-round keeps the rows before

        def environment() -> dict:
            return {
                "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "cores": cores,
                "load": os.getloadavg()[0],
                "model": args.model,
                "precision": args.precision,
                "autocast": str(model.autocast),
                "batch": args.batch,
                "images": args.images,
                "unique": unique,
                "side": args.side,
                "mixed": args.mixed,
                "model_load_s": round(load_s, 2),
                "gpu_decode": prep.gpu_decode,
            }

        stem = (
            f"embed_bench_{args.device.replace(':', '')}_{args.model}_{args.precision}"
            f"{'_pil' if args.no_gpu_decode else ''}{'_mixed' if args.mixed else ''}"
        )

        def save(rows: dict[str, tuple[float, str]], text: str = "") -> None:
            """The JSON after every row, marked partial until the end: a step that runs out of time (gpu_check.sh's
            timeouts) still leaves the rows it measured for the summary."""
            if not args.out:
                return
            os.makedirs(args.out, exist_ok=True)
            env = {**environment(), "partial": not text}
            report = {"env": env, "rows": {k: {"img_s": v, "note": n} for k, (v, n) in rows.items()}}
            with open(f"{args.out}/{stem}.json.tmp", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(f"{args.out}/{stem}.json.tmp", f"{args.out}/{stem}.json")  # never a half-written file
            if text:
                with open(f"{args.out}/{stem}.txt", "w") as f:
                    f.write(text + "\n")

        for round_ in range(args.repeat):  # interleaved, so a load change on a shared machine hits every row
            best(
                "a model-only (preloaded pixels)",
                model_only(model, pixels, args.batch, work),
                f"{work} images, batch {args.batch}",
            )
            best("b decode-only, PIL, 1 core", decode_cpu(sample[:256], size, 1), "draft + resize, per core")
            best(f"b decode-only, PIL, {cores} threads", decode_cpu(sample, size, cores), f"{len(sample)} images")
            if cuda and prep.gpu_decode:
                rate = decode_gpu(prep, blobs, args.batch, work)
                best(
                    "b decode-only, nvjpeg batched + resize",
                    rate,
                    f"batch {args.batch}, {prep.fallbacks} fell back to PIL",
                )
            elif cuda:
                why = "disabled (--no-gpu-decode)" if args.no_gpu_decode else "torchvision not installed"
                rows["b decode-only, nvjpeg batched + resize"] = (float("nan"), why)
            if nv_prep is not None:
                rate = decode_gpu(nv_prep, blobs, args.batch, work)
                note = f"batch {args.batch}, {nv_prep.fallbacks} fell back to PIL"
                best("b decode-only, nvimgcodec batched + resize", rate, note)
            shutil.rmtree(layout.embeddings(args.model, "bench"), ignore_errors=True)
            stats = embed_shard(layout, "bench", model, config)
            settings = f"prefetch={config.prefetch_batches} fetch={config.fetch_workers} decode={config.decode_workers}"
            best(
                "d embed_shard end to end",
                stats.images_per_s,
                f"{stats.embedded} embedded, nvjpeg={prep.gpu_decode}, {settings}; {stage_note(stats)}",
            )
            if "naive" not in skip:
                best(
                    "e naive loop (read, decode, infer, write)",
                    naive(model, uris[:naive_n], size, args.batch, out_dir),
                    f"{naive_n} images, one thread decodes",
                )
            log(f"round {round_ + 1}/{args.repeat} done")

        for i, setting in enumerate(filter(None, args.sweep.split(";"))):
            knobs = {
                "prefetch": config.prefetch_batches,
                "fetch": config.fetch_workers,
                "decode": config.decode_workers,
                "batch": args.batch,
                "assemble": config.assembly_workers,
                "decoder": config.gpu_decoder,
            }
            for pair in setting.split(","):
                key, _, value = (part.strip() for part in pair.partition("="))
                if key == "decoder" and value in GPU_DECODERS:
                    knobs[key] = value
                    continue
                if key not in knobs or key == "decoder" or not value.isdigit():
                    p.error(f"--sweep: {pair!r} is not decoder={'|'.join(GPU_DECODERS)} nor one of "
                            f"{sorted(k for k in knobs if k != 'decoder')}=<integer>")  # fmt: skip
                knobs[key] = int(value)
            swept = embed_config(knobs["prefetch"], knobs["fetch"], knobs["decode"], knobs["batch"], knobs["assemble"],
                                 knobs["decoder"])  # fmt: skip
            name = f"d sweep {setting.replace(' ', '')}"[:44]
            if cuda and swept.gpu_decoder == "nvimgcodec" and nv_prep is None:
                rows[name] = (float("nan"), f"nvimgcodec unavailable: {no_nv}")
                save(rows)
                continue
            shutil.rmtree(layout.embeddings(args.model, "bench"), ignore_errors=True)
            stats = embed_shard(layout, "bench", model, swept)
            full = " ".join(f"{k}={v}" for k, v in knobs.items())
            rows[name] = (stats.images_per_s, f"{stats.embedded} embedded, one run, {full}; {stage_note(stats)}")
            save(rows)
            log(f"sweep {i + 1}: {name}: {stats.images_per_s:.0f} img/s")

        m = rows["a model-only (preloaded pixels)"][0]
        one = rows["b decode-only, PIL, 1 core"][0]
        if cuda and prep.gpu_decode:
            d = rows["b decode-only, nvjpeg batched + resize"][0]
            limit = min(m, d)
            rows["c compute limit"] = (limit, "min(model, nvjpeg): stages overlap on separate streams")
            rows["c compute limit, serialised"] = (
                1 / (1 / m + 1 / d),
                "1/(1/model + 1/nvjpeg): if they cannot overlap",
            )
        elif cuda:
            d = rows[f"b decode-only, PIL, {cores} threads"][0]
            limit = min(m, d)
            rows["c compute limit"] = (limit, "min(model on GPU, PIL on all cores)")
        else:
            limit = 1 / (1 / m + 1 / (one * cores))
            rows["c compute limit"] = (limit, f"1/(1/model + 1/(decode per core x {cores})): both share the cores")
        order = ["a ", "b ", "c ", "d ", "e "]
        rows = dict(sorted(rows.items(), key=lambda kv: order.index(kv[0][:2])))
        if "ray" not in skip:
            rate, note = ray_data(root, card, args.device, uris, args.batch, cores)
            rows["f Ray Data map_batches + actor"] = (rate, note)
            log("ray done")
        if cuda:
            rows["gpu decode agreement"] = (
                _agreement(model, prep, blobs[:256], size),
                "mean cosine, nvjpeg vs PIL path",
            )

        text = table(rows, limit, environment())
        print(text)
        save(rows, text)
        return 0
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


def _agreement(model, prep: Preprocessor, blobs: list[bytes], size: int | Preprocess) -> float:
    if not prep.gpu_decode:
        return float("nan")
    gpu, failed = prep.batch([prep.stage(b) for b in blobs])
    cpu = np.stack([decode(b, size, 64_000_000) for b in blobs])
    a, b = model.embed_pixels(gpu), model.embed(cpu)
    return float((a * b).sum(1).mean()) if not failed else float("nan")


def stage_note(stats) -> str:
    """EmbedStats.stage_s as milliseconds per batch: where embed_shard's main thread (and writer) spent it."""
    batches = max(1, -(-stats.images_embedded_now // max(1, stats.batch_size)))
    ms = {k: 1000 * v / batches for k, v in stats.stage_s.items()}
    main = " ".join(f"{k} {ms.get(k, 0):.1f}" for k in ("wait_batch", "forward", "write_wait", "other"))
    writer = " ".join(f"{k[7:]} {ms.get(k, 0):.1f}" for k in ("writer_results", "writer_write"))
    return f"ms/batch main: {main}; writer: {writer}"


def table(rows: dict[str, tuple[float, str]], limit: float, env: dict) -> str:
    naive_rate = next((v for k, (v, _) in rows.items() if k.startswith("e ")), float("nan"))
    ray_rate = next((v for k, (v, _) in rows.items() if k.startswith("f ")), float("nan"))
    head = " ".join(f"{k}={v}" for k, v in env.items())
    lines = [head, f"{'stage':44} {'img/s':>9} {'x limit':>8} {'x naive':>8} {'x ray':>7}  note", "-" * 110]
    for name, (rate, note) in rows.items():
        if name.startswith("gpu decode agreement"):
            lines.append(f"{name:44} {rate:>9.4f} {'':>8} {'':>8} {'':>7}  {note}")
            continue

        def ratio(ref: float, rate: float = rate) -> str:  # this row's rate, bound now
            return f"{rate / ref:.2f}" if np.isfinite(rate) and np.isfinite(ref) and ref > 0 else "-"

        shown = f"{rate:9.1f}" if np.isfinite(rate) else f"{'-':>9}"
        lines.append(f"{name:44} {shown} {ratio(limit):>8} {ratio(naive_rate):>8} {ratio(ray_rate):>7}  {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
