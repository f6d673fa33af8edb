"""Every kind of broken or unusual input: embedded when valid, a precise reject otherwise; the partition succeeds."""

import io
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from backfill.config import EmbedConfig
from backfill.embed import embed_shard, load_embeddings, read_rejects
from backfill.manifest import write_shard
from backfill.runtime import load_model
from tests.conftest import MODEL

rng = np.random.default_rng(5)


def rgb(w=64, h=48) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid small PNG whose header declares width x height (a decompression bomb)."""
    data = bytearray(encoded(Image.new("L", (8, 8)), "PNG"))
    ihdr = 16  # 8-byte signature, 4-byte length, 4-byte "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("P", (40, 30), color=i * 40) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


VALID = {
    "png_alpha.png": lambda: encoded(Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA"), "PNG"),
    "png_16bit.png": lambda: encoded(Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)), "PNG"),
    "cmyk.jpg": lambda: encoded(rgb().convert("CMYK"), "JPEG"),
    "grayscale.jpg": lambda: encoded(rgb().convert("L"), "JPEG"),
    "palette.gif": lambda: encoded(rgb().convert("P"), "GIF"),
    "animated.gif": animated_gif,
    "one_pixel.png": lambda: encoded(rgb(1, 1), "PNG"),
    "very_wide.jpg": lambda: encoded(rgb(10000, 10), "JPEG"),
}

REJECTED = {
    "truncated.jpg": (lambda: encoded(rgb(256, 256), "JPEG")[:700], "truncated or corrupt image"),
    "zero_bytes.jpg": (lambda: b"", "empty file (0 bytes)"),
    "text.jpg": (lambda: b"just some text, not an image\n", "not an image: format not recognised"),
    "bomb.png": (lambda: png_declaring(100_000, 100_000), "decompression bomb: declared 100000x100000 exceeds 64000000 pixels"),
}


@pytest.fixture
def bad_shard(registered, tmp_path):
    layout, card = registered
    folder = tmp_path / "inputs"
    folder.mkdir()
    uris: list = []
    expected: list = []
    for name, make in VALID.items():
        (folder / name).write_bytes(make())
        uris.append(str(folder / name).encode())
        expected.append(None)
    for name, (make, reason) in REJECTED.items():
        (folder / name).write_bytes(make())
        uris.append(str(folder / name).encode())
        expected.append(reason)
    # a file whose name is not valid UTF-8: listed as raw bytes, the only way Parquet can hold it
    odd = os.fsencode(str(folder)) + b"/caf\xe9-\xff.jpg"
    with open(odd, "wb") as f:
        f.write(encoded(rgb(), "JPEG"))
    uris.append(odd)
    expected.append(None)
    for uri, reason in [
        (os.fsencode(str(folder / "missing.jpg")), "missing object: "),
        (None, "manifest uri is null or empty"),
        (b"nosuchproto://bucket/key.jpg", "malformed uri: 'nosuchproto://bucket/key.jpg' uses unsupported protocol 'nosuchproto'"),
    ]:
        uris.append(uri)
        expected.append(reason)
    ids = list(range(5000, 5000 + len(uris)))
    write_shard(layout, "odd", pa.table({"image_id": pa.array(ids, pa.int64()), "uri": pa.array(uris, pa.binary())}))
    return layout, card, ids, expected


def test_each_input_is_embedded_or_rejected_with_its_reason(bad_shard):
    layout, card, ids, expected = bad_shard
    stats = embed_shard(layout, "odd", load_model(layout, card), EmbedConfig(batch_size=4, chunk_size=5, max_reject_rate=0.6))
    assert stats.images == len(ids) and stats.rejects == sum(e is not None for e in expected)
    got_ids, vectors, valid = load_embeddings(layout, MODEL, "v1", "odd")
    assert got_ids.tolist() == ids
    assert valid.tolist() == [e is None for e in expected]
    assert np.isfinite(vectors[valid]).all() and np.allclose(np.linalg.norm(vectors[valid], axis=1), 1, atol=1e-2)
    rejects = read_rejects(layout, MODEL, "v1", "odd").to_pylist()
    assert [r["image_id"] for r in rejects] == [i for i, e in zip(ids, expected) if e is not None]
    for row, reason in zip(rejects, [e for e in expected if e is not None]):
        assert row["reason"].startswith(reason), (row, reason)


def test_rejects_are_listed_by_the_cli(bad_shard, capsys):
    from backfill.cli import main

    layout, card, ids, expected = bad_shard
    embed_shard(layout, "odd", load_model(layout, card), EmbedConfig(batch_size=4, chunk_size=5, max_reject_rate=0.6))
    assert main(["--root", layout.store.root, "rejects", "v1", "--shard", "odd", "--list"]) == 0
    out = capsys.readouterr().out
    assert "refcnn v1: 7 rejects in 1 shards" in out
    assert "1  decompression bomb\n" in out and "1  malformed uri\n" in out
    assert "\t5014\tNone\tmanifest uri is null or empty" in out


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_but_unusual_images_embed_like_their_rgb_self(registered, tmp_path, name):
    from backfill.images import decode

    pixels = decode(VALID[name](), 32, 64_000_000)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_broken_images_give_precise_reasons(name):
    from backfill.images import BadImage, decode

    make, reason = REJECTED[name]
    with pytest.raises(BadImage) as exc:
        decode(make(), 32, 64_000_000)
    assert str(exc.value).startswith(reason)


def test_transparent_pixels_become_white_not_their_hidden_colour():
    from backfill.images import decode

    hidden_red = np.zeros((20, 20, 4), np.uint8)
    hidden_red[..., 0] = 255  # red, fully transparent
    pixels = decode(encoded(Image.fromarray(hidden_red, "RGBA"), "PNG"), 8, 10**6)
    assert (pixels == 255).all()


def test_16_bit_images_keep_their_contrast():
    from backfill.images import decode

    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (16, 1))
    pixels = decode(encoded(Image.fromarray(ramp), "PNG"), 16, 10**6)
    assert pixels[..., 0].min() < 30 and pixels[..., 0].max() > 225  # not clipped to white


def test_cmyk_colours_survive():
    from backfill.images import decode

    red = Image.new("RGB", (32, 32), (220, 20, 20)).convert("CMYK")
    r, g, b = decode(encoded(red, "JPEG", quality=95), 8, 10**6).reshape(-1, 3).mean(0)
    assert r > 150 and g < 90 and b < 90


def test_animated_gif_uses_its_first_frame():
    from backfill.images import decode

    frames = [Image.new("RGB", (24, 24), c).convert("P") for c in ((0, 0, 255), (255, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = decode(buf.getvalue(), 8, 10**6).reshape(-1, 3).mean(0)
    assert b > 200 and r < 50
