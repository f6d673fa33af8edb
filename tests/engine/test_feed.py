"""The decode stage and batch assembly: header parsing, the nvjpeg path's per-image fallback, parity with PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from backfill import feed
from backfill.feed import Encoded, Preprocessor, jpeg_header
from backfill.images import BadImage, decode

SIZE = 32


def _image(seed: int = 0, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _bytes(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pil_decoder(calls: list[int], refuse: tuple[bytes, ...] = (), lenient: bool = False):
    """A CPU stand-in for torchvision.io.decode_jpeg(list, mode, device): full-size CHW uint8, raises like nvjpeg.

    `refuse`: inputs it raises on (as nvjpeg does on JPEG features it lacks); `lenient`: it decodes
    truncated JPEGs (gray-filled), as nvjpeg did on the H100."""

    def decode_jpeg(datas, mode, device):
        calls.append(len(datas))
        out = []
        for data in datas:
            blob = data.numpy().tobytes()
            if blob in refuse:
                raise RuntimeError("nvjpeg: unsupported")
            img = Image.open(io.BytesIO(blob))
            if lenient:
                img.load = lambda img=img: _load_truncated(img)
            img.load()  # a truncated JPEG raises here, as nvjpeg does
            out.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous())
        return out

    return decode_jpeg


def _load_truncated(img: Image.Image):
    from PIL import ImageFile

    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        return type(img).load(img)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_jpeg_header_reads_frame_without_decoding():
    baseline = jpeg_header(_bytes(_image(), quality=90))
    assert (baseline.marker, baseline.width, baseline.height, baseline.components, baseline.adobe) == (
        0xC0,
        80,
        60,
        3,
        False,
    )
    assert jpeg_header(_bytes(_image(), progressive=True)).marker == 0xC2
    assert jpeg_header(_bytes(_image().convert("L"))).components == 1
    cmyk = jpeg_header(_bytes(_image().convert("CMYK")))
    assert cmyk.components == 4 and cmyk.adobe
    assert jpeg_header(_bytes(_image(), "PNG")) is None
    assert jpeg_header(b"\xff\xd8\xff") is None  # truncated before any frame header


def test_cpu_preprocessor_matches_pil_decode():
    blobs = [_bytes(_image(i), quality=85) for i in range(5)]
    prep = Preprocessor(SIZE, 10**8, "cpu")
    assert not prep.gpu_decode
    items = [prep.stage(b) for b in blobs]
    pixels, failed = prep.batch(items)
    assert failed == {}
    assert pixels.shape == (5, 3, SIZE, SIZE) and pixels.dtype == torch.uint8
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    expected = np.stack([decode(b, SIZE, 10**8) for b in blobs])
    assert np.array_equal(pixels.permute(0, 2, 3, 1).numpy(), expected)


def test_without_torchvision_cuda_falls_back_to_pil(monkeypatch):
    # torchvision missing (as here): a CUDA preprocessor decodes every image with PIL, same pixels
    monkeypatch.setattr(feed, "_torchvision_decode_jpeg", lambda: None)
    prep = Preprocessor(SIZE, 10**8, "cuda")
    assert not prep.gpu_decode
    blob = _bytes(_image(3), quality=90)
    staged = prep.stage(blob)
    assert isinstance(staged, np.ndarray)
    assert np.array_equal(staged, decode(blob, SIZE, 10**8))


def test_gpu_path_decodes_jpegs_in_one_call_and_falls_back_per_image():
    calls: list[int] = []
    good = [_bytes(_image(i, (64, 64)), quality=95) for i in range(3)]
    refused = _bytes(_image(8, (64, 64)), quality=80)  # a complete JPEG the GPU decoder fails on
    prep = Preprocessor(SIZE, 10**8, "cpu", decoder=_pil_decoder(calls, refuse=(refused,)))
    other_size = _bytes(_image(7, (90, 50)), quality=95)
    png = _bytes(_image(4), "PNG")
    progressive = _bytes(_image(5), progressive=True, quality=95)
    cmyk = _bytes(_image(6).convert("CMYK"))
    blobs = [good[0], png, good[1], progressive, refused, cmyk, other_size, good[2]]
    items = [prep.stage(b) for b in blobs]
    assert [isinstance(i, Encoded) for i in items] == [True, False, True, False, True, False, True, True]
    pixels, failed = prep.batch(items)
    # the batched call failed on the refused image; each was retried alone; PIL decoded that one
    assert calls[0] == 5 and calls[1:] == [1] * 5
    assert failed == {}
    assert prep.fallbacks == 1
    assert pixels.shape == (8, 3, SIZE, SIZE)
    reference = np.stack([decode(b, SIZE, 10**8) for b in blobs]).astype(np.int16)
    got = pixels.permute(0, 2, 3, 1).numpy().astype(np.int16)
    # PIL-decoded images are PIL's pixels exactly; decoder-path ones are resized by torch, not PIL
    for i in (1, 3, 4, 5):
        assert np.array_equal(got[i], reference[i])
    for i in (0, 2, 6, 7):
        assert np.abs(got[i] - reference[i]).mean() < 6, i


def test_truncated_jpeg_is_rejected_by_pil_on_the_gpu_path_too():
    # nvjpeg decoded a truncated baseline JPEG that PIL rejects (H100 run): it must not reach nvjpeg
    calls: list[int] = []
    prep = Preprocessor(SIZE, 10**8, "cpu", decoder=_pil_decoder(calls, lenient=True))
    whole = _bytes(_image(0, (64, 64)), quality=95)
    truncated = whole[: len(whole) // 2]
    assert prep.batch([Encoded(truncated, jpeg_header(truncated))])[1] == {}  # the lenient decoder accepts it
    with pytest.raises(BadImage) as cpu:
        decode(truncated, SIZE, 10**8)
    with pytest.raises(BadImage) as gpu:
        prep.stage(truncated)
    assert str(gpu.value) == str(cpu.value) and str(cpu.value).startswith(
        "truncated or corrupt image: image file is truncated"
    )
    # a complete JPEG, and one with bytes after its end (PIL accepts both), still decode
    assert isinstance(prep.stage(whole), Encoded)
    padded = prep.stage(whole + b"\0" * 7)
    assert not isinstance(padded, Encoded) and np.array_equal(padded, decode(whole, SIZE, 10**8))


def test_gpu_path_bounds_pixels_from_the_header():
    prep = Preprocessor(SIZE, 1000, "cpu", decoder=_pil_decoder([]))
    with pytest.raises(BadImage, match="decompression bomb: declared 80x60 exceeds 1000 pixels"):
        prep.stage(_bytes(_image(), quality=90))


def embedded_both_ways(registered, monkeypatch, make_decoder, config) -> tuple[bool, np.ndarray]:
    """Shard 0 embedded by the PIL path, then again with `make_decoder()` as the GPU path's decoder (on the CPU):
    (the same ids in the same order, the cosine of each row's two vectors)."""
    from backfill.embed import embed_shard, load_embeddings
    from backfill.runtime import load_model

    layout, card = registered
    model = load_model(layout, card)
    embed_shard(layout, "shard-00000", model, config)
    ids, reference, _ = load_embeddings(layout, card.name, card.version, "shard-00000")
    layout.store.rm(layout.embeddings(card.name, card.version, "shard-00000"), recursive=True)
    real = feed.Preprocessor.__init__

    def with_decoder(self, size, max_pixels, device="cpu", gpu_decode=True, decoder=None, **kw):
        real(self, size, max_pixels, device, gpu_decode, decoder=make_decoder(), **kw)

    monkeypatch.setattr(feed.Preprocessor, "__init__", with_decoder)
    embed_shard(layout, "shard-00000", model, config)
    ids2, vectors, _ = load_embeddings(layout, card.name, card.version, "shard-00000")
    return np.array_equal(ids, ids2), (reference * vectors).sum(1)


def test_embed_shard_same_vectors_through_the_decoder_path(registered, monkeypatch):
    from backfill.config import EmbedConfig

    calls: list[int] = []
    config = EmbedConfig(batch_size=8, chunk_size=16)
    same_ids, cosine = embedded_both_ways(registered, monkeypatch, lambda: _pil_decoder(calls), config)
    assert calls and same_ids
    assert cosine.mean() > 0.97, cosine.mean()


def test_batch_size_zero_is_chosen_per_device():
    from backfill.config import EmbedConfig
    from backfill.errors import ConfigError

    assert EmbedConfig(batch_size=0).images_per_batch == 32
    assert EmbedConfig(batch_size=0, device="cuda:1").images_per_batch == 256
    assert EmbedConfig(batch_size=48, device="cuda").images_per_batch == 48
    with pytest.raises(ConfigError, match=r"batch_size must be in 1..8192 \(or 0: per device\), got -1"):
        EmbedConfig(batch_size=-1)


def test_embed_shard_with_per_device_batch(registered):
    from backfill.config import EmbedConfig
    from backfill.embed import embed_shard
    from backfill.runtime import load_model

    layout, card = registered
    stats = embed_shard(layout, "shard-00001", load_model(layout, card), EmbedConfig(batch_size=0, chunk_size=8))
    assert stats.batch_size == 32 and stats.embedded + stats.rejects == stats.images == 20
