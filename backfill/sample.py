"""A synthetic image corpus with near-duplicate groups, and manifest shards that list it."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from backfill.manifest import list_shards, write_shard
from backfill.storage import Layout

TRANSFORMS = ("crop", "resize", "colour", "rotate", "reencode")


@dataclass(frozen=True)
class SampleSpec:
    images: int = 2400
    shards: int = 8
    max_copies: int = 4  # near-duplicates per original: 0..max_copies
    seed: int = 7

    def __post_init__(self) -> None:
        if self.images < 1 or self.shards < 1 or self.shards > self.images:
            raise ValueError(f"need 1 <= shards <= images, got images={self.images} shards={self.shards}")


def synthetic_image(rng: np.random.Generator) -> Image.Image:
    """A random scene: a gradient, texture or flat background with 3-11 coloured shapes."""
    w, h = int(rng.integers(160, 640)), int(rng.integers(160, 640))
    kind = rng.integers(3)
    if kind == 0:  # gradient
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
        arr = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3))
    elif kind == 1:  # smooth noise texture
        small = rng.integers(0, 256, (int(rng.integers(3, 12)), int(rng.integers(3, 12)), 3)).astype(np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    else:  # flat colour
        arr = np.broadcast_to(rng.integers(0, 256, 3), (h, w, 3))
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
        shape = rng.integers(4)
        if shape == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif shape == 2:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(2, 12)))
    return img


def _transform(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A near-duplicate of img, and the JPEG quality to save it with."""
    w, h = img.size
    if kind == "crop":
        f = rng.uniform(0.75, 0.92)
        cw, ch = int(w * f), int(h * f)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch)), 90
    if kind == "resize":
        f = rng.uniform(0.4, 0.8)
        return img.resize((max(16, int(w * f)), max(16, int(h * f))), Image.BILINEAR), 90
    if kind == "colour":
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
        return ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25)), 90
    if kind == "rotate":
        return img.rotate(float(rng.uniform(-8, 8)), resample=Image.BILINEAR, fillcolor=(128, 128, 128)), 90
    return img.filter(ImageFilter.GaussianBlur(0.6)), int(rng.integers(25, 45))  # re-encode, low quality


def make_sample_corpus(
    layout: Layout, spec: SampleSpec = SampleSpec(), progress: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Write JPEGs and manifest shards (image_id, uri, group_id, transform); refuses to overwrite."""
    if list_shards(layout):
        raise FileExistsError(f"a corpus already exists at {layout.store.display(layout.manifests)}; use a new root")
    rng = np.random.default_rng(spec.seed)
    rows: list[tuple[int, str, int, str]] = []
    group = 0
    while len(rows) < spec.images:
        original = synthetic_image(rng)
        members = [("original", original, 92)]
        for kind in rng.choice(
            TRANSFORMS, size=min(int(rng.integers(0, spec.max_copies + 1)), len(TRANSFORMS)), replace=False
        ):
            img, quality = _transform(original, str(kind), rng)
            members.append((str(kind), img, quality))
        for kind, img, quality in members[: spec.images - len(rows)]:
            image_id = len(rows)
            uri = layout.store.url("corpus", "images", f"{image_id // 1000:04d}", f"{image_id:08d}.jpg")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            layout.store.write_bytes(uri, buf.getvalue())
            rows.append((image_id, layout.store.display(uri), group, kind))
            if progress:
                progress(1)
        group += 1
    # spread each group over shards, as real corpora do: near-duplicates arrive at different times
    order = rng.permutation(len(rows))
    per_shard = math.ceil(len(rows) / spec.shards)
    for s in range(spec.shards):
        part = sorted(order[s * per_shard : (s + 1) * per_shard].tolist())
        table = pa.table(
            {
                "image_id": pa.array([rows[i][0] for i in part], pa.int64()),
                "uri": pa.array([rows[i][1] for i in part], pa.string()),
                "group_id": pa.array([rows[i][2] for i in part], pa.int64()),
                "transform": pa.array([rows[i][3] for i in part], pa.string()),
            }
        )
        write_shard(layout, f"shard-{s:05d}", table)
    return {"images": len(rows), "groups": group, "shards": spec.shards}
