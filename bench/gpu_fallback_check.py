"""On a CUDA machine with torchvision: a mixed batch (baseline JPEGs, PNG, progressive, CMYK, truncated) through
the nvjpeg path, compared with PIL (same accept/reject outcome and reason, close pixels). Prints one table; exits 1
if the fallback or the pixels are wrong.

    python bench/gpu_fallback_check.py                                  # torchvision's nvjpeg, on CUDA
    python bench/gpu_fallback_check.py --decoder nvimgcodec             # nvImageCodec, on CUDA
    python bench/gpu_fallback_check.py --decoder nvimgcodec --device cpu   # nvImageCodec's CPU backend (no GPU)
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backfill.config import GPU_DECODERS  # noqa: E402
from backfill.feed import Encoded, Preprocessor  # noqa: E402
from backfill.images import BadImage, decode  # noqa: E402
from backfill.sample import synthetic_image  # noqa: E402


def _bytes(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decoder", choices=GPU_DECODERS, default="torchvision", help="the GPU path's JPEG decoder")
    p.add_argument("--device", default="cuda", help="cuda; or cpu with --decoder nvimgcodec (its CPU backend)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(5)
    imgs = [synthetic_image(rng) for _ in range(6)]
    good = _bytes(imgs[0], quality=90)
    cases = {
        "baseline jpeg": good,
        "baseline jpeg 2": _bytes(imgs[1], quality=75),
        "grayscale jpeg": _bytes(imgs[2].convert("L"), quality=90),
        "png": _bytes(imgs[3], "PNG"),
        "progressive jpeg": _bytes(imgs[4], progressive=True, quality=90),
        "cmyk jpeg": _bytes(imgs[5].convert("CMYK"), quality=90),
        "corrupt jpeg": good[: len(good) // 3],
        # data cut but the EOI marker kept: goes to nvjpeg; PIL accepts it (gray fill), so nvjpeg must
        # accept it or fall back to PIL; its pixels are reported, not judged (the image is damaged)
        "cut jpeg, EOI kept": good[: len(good) // 3] + b"\xff\xd9",
    }
    if args.device == "cpu" and args.decoder == "nvimgcodec":
        from backfill.decode_nvimgcodec import NvImageCodecDecoder

        prep = Preprocessor(224, 64_000_000, "cpu", decoder=NvImageCodecDecoder("cpu"))
    else:
        prep = Preprocessor(224, 64_000_000, args.device, gpu_decoder=args.decoder)
    if not prep.gpu_decode:
        print("gpu fallback check: torchvision not installed or no CUDA device; skipped")
        return 0
    print(f"decoder: {args.decoder} on {args.device}")
    staged, rejected = {}, {}
    for name, blob in cases.items():
        try:
            staged[name] = prep.stage(blob)
        except Exception as exc:
            rejected[name] = str(exc)
    names = list(staged)
    pixels, failed = prep.batch([staged[n] for n in names])
    ok_names = [n for i, n in enumerate(names) if i not in failed]
    got = pixels.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16)
    bad = 0
    print(f"{'case':20} {'path':8} {'GPU path':34} {'PIL (CPU path)':34} {'mean |gpu - PIL|':>17}")
    for name in cases:
        path = args.decoder[:8] if isinstance(staged.get(name), Encoded) else "PIL"
        gpu_reason = rejected.get(name) or (
            failed[names.index(name)] if name in names and names.index(name) in failed else None
        )
        try:
            ref, cpu_reason = decode(cases[name], 224, 64_000_000).astype(np.int16), None
        except BadImage as exc:
            ref, cpu_reason = None, str(exc)
        gpu_col = "rejected: " + gpu_reason[:24] if gpu_reason else "ok"
        cpu_col = "rejected: " + cpu_reason[:24] if cpu_reason else "ok"
        if gpu_reason or cpu_reason:
            # an image must get the same outcome (and reason) on both paths
            same = gpu_reason == cpu_reason
            print(f"{name:20} {path:8} {gpu_col:34} {cpu_col:34} {'-':>17}{'' if same else '  MISMATCH'}")
            bad += not same
            continue
        diff = float(np.abs(got[ok_names.index(name)] - ref).mean())
        print(f"{name:20} {path:8} {gpu_col:34} {cpu_col:34} {diff:17.2f}{'' if diff <= 8 else '  PIXELS DIFFER'}")
        bad += diff > 8 and name != "cut jpeg, EOI kept"
    bad += "corrupt jpeg" not in rejected and not ("corrupt jpeg" in names and names.index("corrupt jpeg") in failed)
    if prep.fallbacks > 1:  # only the cut JPEG with its EOI may need PIL; the rest are complete baseline JPEGs
        print(f"expected at most 1 fallback (the cut JPEG), got {prep.fallbacks}: nvjpeg refused good JPEGs")
        bad += 1
    print(f"fallbacks to PIL inside batch(): {prep.fallbacks}; problems: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
