"""JPEG decode-to-scale on one thread: PIL `draft` (the engine's fallback path) against libjpeg-turbo bindings
(simplejpeg, PyTurboJPEG), same images, same contracts, same run. Prints a table; not a test.

    .venv/bin/python bench/decode_bench.py                 # ~1 min here
    .venv/bin/python bench/decode_bench.py --seconds 0.1 --no-cosine   # quicker

Every candidate decodes at the DCT scale PIL's draft picks and resizes with the same PIL code
(Preprocess.apply_pil), so the outputs are compared pixel for pixel (mean |candidate - PIL|) and through
the pretrained EfficientNet-Lite0 (cosine of the embeddings); a JPEG a candidate does not decode (CMYK)
goes to PIL. The engine keeps PIL (backfill/images.py): nothing here won by a margin (docs/performance.md).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backfill.images import decode  # noqa: E402
from backfill.preprocess import Preprocess  # noqa: E402
from backfill.sample import synthetic_image  # noqa: E402

MAX_PIXELS = 64_000_000
SIZE = 224  # the input size of the ResNets and EfficientNet-Lite0


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def cases() -> dict[str, bytes]:
    """The JPEG kinds a corpus holds, made in memory from the sample corpus's scenes."""
    rng = np.random.default_rng(11)
    scene = [synthetic_image(rng) for _ in range(4)]
    return {
        "baseline 512x512 q90": _jpeg(scene[0].resize((512, 512)), quality=90),
        "progressive 512x512": _jpeg(scene[1].resize((512, 512)), quality=90, progressive=True),
        "grayscale 512x512": _jpeg(scene[2].resize((512, 512)).convert("L"), quality=90),
        "cmyk 512x512": _jpeg(scene[3].resize((512, 512)).convert("CMYK"), quality=90),
        "large 4000x3000 q85": _jpeg(scene[0].resize((4000, 3000), Image.BICUBIC), quality=85),
        "small 160x120 q75": _jpeg(scene[1].resize((160, 120)), quality=75),
    }


def contracts() -> dict[str, Preprocess]:
    return {
        "squash": Preprocess(SIZE),
        "resize_crop": Preprocess(SIZE, "resize_crop", interpolation="bicubic"),
        "pad": Preprocess(SIZE, "pad"),
        "bare size (no contract)": Preprocess.of(SIZE),
    }


def candidates() -> dict[str, tuple[Callable[[bytes, Preprocess], np.ndarray] | None, str]]:
    """name -> (decode(bytes, prep) or None, version or why not)."""
    out: dict[str, tuple[Callable | None, str]] = {
        "PIL draft": (lambda b, p: decode(b, p, MAX_PIXELS), f"pillow {metadata.version('pillow')}")
    }
    try:
        import simplejpeg

        def sj(data: bytes, prep: Preprocess) -> np.ndarray:
            got = turbo_path(data, prep, simplejpeg.decode_jpeg_header, _simplejpeg_scaled)
            return decode(data, prep, MAX_PIXELS) if got is None else got

        out["simplejpeg"] = (sj, f"simplejpeg {simplejpeg.__version__}")
    except ImportError as exc:
        out["simplejpeg"] = (None, f"not installed ({exc})")
    try:
        from turbojpeg import TJPF_GRAY, TJPF_RGB, TurboJPEG

        tj = TurboJPEG()

        def header(data: bytes) -> tuple[int, int, str, str]:
            width, height, _, colorspace = tj.decode_header(data)
            return height, width, {0: "RGB", 1: "YCbCr", 2: "Gray"}.get(colorspace, "CMYK"), ""

        def tj_decode(data: bytes, scale: int, gray: bool) -> np.ndarray:
            return tj.decode(data, pixel_format=TJPF_GRAY if gray else TJPF_RGB, scaling_factor=(1, scale))

        def turbo(data: bytes, prep: Preprocess) -> np.ndarray:
            got = turbo_path(data, prep, header, tj_decode)
            return decode(data, prep, MAX_PIXELS) if got is None else got

        out["PyTurboJPEG"] = (turbo, f"PyTurboJPEG {metadata.version('PyTurboJPEG')} (system libturbojpeg)")
    except Exception as exc:  # ImportError, or RuntimeError: the shared library is missing or too old
        out["PyTurboJPEG"] = (None, f"unavailable: {str(exc).splitlines()[0]}")
    return out


def turbo_path(
    data: bytes,
    prep: Preprocess,
    header: Callable[[bytes], tuple],
    decode_scaled: Callable[[bytes, int, bool], np.ndarray],
) -> np.ndarray | None:
    """A clean JPEG decoded by a libjpeg-turbo binding at the DCT scale PIL's draft picks, resized by PIL, or
    None (not a JPEG, CMYK/YCCK, out of the pixel bound, any decoder complaint): PIL's to accept or reject.
    A grayscale JPEG is decoded and resized in one channel, as the PIL path does (Preprocess.apply_pil).

    `header(data) -> (height, width, colourspace, subsampling)`;
    `decode_scaled(data, scale, gray) -> HxWx3 uint8, or HxWx1 for gray`.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colourspace, _ = header(data)
        if colourspace not in ("YCbCr", "RGB", "Gray") or not 1 <= width * height <= MAX_PIXELS:
            return None
        scale = draft_scale(width, height, prep.draft_size(width, height))
        gray = colourspace == "Gray"
        pixels = decode_scaled(data, scale, gray)
    except Exception:  # simplejpeg raises ValueError for anything it will not decode strictly
        return None
    channels = 1 if gray else 3
    if pixels.ndim != 3 or pixels.shape[2] != channels or pixels.shape[:2] != (-(-height // scale), -(-width // scale)):
        return None
    return prep.apply_pil(Image.fromarray(pixels[:, :, 0] if gray else pixels), prep.geometry(width, height))


def draft_scale(width: int, height: int, size: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) PIL's JpegImageFile.draft picks for a requested size."""
    fit = min(width // size[0], height // size[1])
    return next(s for s in (8, 4, 2, 1) if fit >= s)


def _simplejpeg_scaled(data: bytes, scale: int, gray: bool = False) -> np.ndarray:
    """simplejpeg at exactly 1/scale: at least the reduced size and at least that factor."""
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return simplejpeg.decode_jpeg(
        data,
        "GRAY" if gray else "RGB",
        min_height=-(-height // scale),
        min_width=-(-width // scale),
        min_factor=scale,
    )


def pil_decode_only(data: bytes, prep: Preprocess) -> None:
    """PIL's share of the PIL path: open, draft, decode; no colour conversion, no resize."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", prep.draft_size(*img.size))
    img.load()


def per_image_s(fns: dict[str, Callable], data: bytes, prep: Preprocess, seconds: float) -> dict[str, float]:
    """CPU seconds of this thread per call, each decoder's best of 5 interleaved rounds: thread CPU time,
    not wall time, so that the other sessions on this shared machine count as little as they can."""
    for fn in fns.values():
        fn(data, prep)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(5):
        for name, fn in fns.items():
            began, n = time.thread_time(), 0
            while True:
                fn(data, prep)
                n += 1
                took = time.thread_time() - began
                if took >= seconds / 5 and n >= 2:
                    break
            best[name] = min(best[name], took / n)
    return best


def cosine_model():
    """The pretrained EfficientNet-Lite0 embedding and its contract, or (None, why)."""
    try:
        import torch

        from backfill.efficientnet import PREPROCESS, Lite0Embedding, pretrained

        net = Lite0Embedding(pretrained()).eval()
    except Exception as exc:
        return None, f"EfficientNet-Lite0 unavailable ({type(exc).__name__}: {exc})"
    mean = torch.tensor(PREPROCESS.mean).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS.std).view(1, 3, 1, 1)

    def embed(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            v = net((x - mean) / std).float()
        return torch.nn.functional.normalize(v, dim=1).numpy()

    return (embed, PREPROCESS), "EfficientNet-Lite0 (pretrained), its own contract"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=0.3, help="timing per (image, contract, decoder)")
    p.add_argument("--no-cosine", action="store_true", help="skip the EfficientNet-Lite0 embedding comparison")
    args = p.parse_args(argv)
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core: per-thread figures
    except (AttributeError, OSError):
        pass
    blobs, preps, decoders = cases(), contracts(), candidates()
    names = [n for n, (fn, _) in decoders.items() if fn is not None]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {platform.machine()}, 1 thread, "
        "CPU ms per image (thread time), "
        f"load {os.getloadavg()[0]:.1f}; " + "; ".join(f"{n}: {v}" for n, (_, v) in decoders.items())
    )
    head = f"{'image':22} {'contract':24} {'PIL decode only':>16} " + " ".join(f"{n + ' ms':>16}" for n in names)
    print(head + f" {'x PIL':>14} {'max mean|d|':>11}")
    print("-" * len(head + " x PIL max mean|d|" + " " * 12))
    totals = dict.fromkeys(names, 0.0)
    worst = 0.0
    for image, data in blobs.items():
        for cname, prep in preps.items():
            timed = {"decode only": pil_decode_only, **{n: decoders[n][0] for n in names}}
            took, diff = per_image_s(timed, data, prep, args.seconds), 0.0
            for n in names:
                totals[n] += took[n]
                out = decoders[n][0](data, prep)
                ref = decoders["PIL draft"][0](data, prep)
                diff = max(diff, float(np.abs(out.astype(np.int16) - ref).mean()))
            worst = max(worst, diff)
            ratios = "/".join(f"{took['PIL draft'] / took[n]:.2f}" for n in names[1:])
            cols = " ".join(f"{1000 * took[n]:16.3f}" for n in ["decode only", *names])
            print(f"{image:22} {cname:24} {cols} {ratios:>14} {diff:11.3f}")
    n_runs = len(blobs) * len(preps)
    rates = {n: n_runs / totals[n] for n in names}
    print("-" * len(head + " x PIL max mean|d|" + " " * 12))
    line = " ".join(f"{rates[n]:16.1f}" for n in names)
    ratios = "/".join(f"{rates[n] / rates['PIL draft']:.2f}" for n in names[1:])
    print(f"{'images/s, this mix':64} {line} {ratios:>14} {worst:11.3f}")
    if not args.no_cosine:
        model, note = cosine_model()
        if model is None:
            print(f"embedding cosine: skipped, {note}")
        else:
            embed, prep = model
            ref = embed(np.stack([decoders["PIL draft"][0](d, prep) for d in blobs.values()]))
            for n in names[1:]:
                got = embed(np.stack([decoders[n][0](d, prep) for d in blobs.values()]))
                print(f"embedding cosine {n} vs PIL, {note}: min {float((got * ref).sum(1).min()):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
