"""nvImageCodec as the GPU path's decoder, run here on its CPU backend: one batched call, the same rejects as PIL."""

from __future__ import annotations

import io
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec's wheels are for Linux (the test extra installs them)")

from backfill.config import EmbedConfig
from backfill.decode_nvimgcodec import NvImageCodecDecoder, load_nvimgcodec
from backfill.errors import ConfigError
from backfill.feed import Encoded, Preprocessor
from backfill.images import BadImage, decode
from backfill.reader import BatchReader
from tests.engine.test_feed import SIZE, _bytes, _image, embedded_both_ways


class Counted(NvImageCodecDecoder):
    """The real decoder, counting its calls and the images in each."""

    def __init__(self, device="cpu"):
        super().__init__(device)
        self.calls: list[int] = []

    def __call__(self, datas, mode=None, device=None):
        self.calls.append(len(datas))
        return super().__call__(datas, mode, device)


def _bad_component(jpeg: bytes) -> bytes:
    """A complete baseline JPEG whose scan names a component the frame lacks: both decoders refuse it."""
    sos = jpeg.index(b"\xff\xda")
    return jpeg[: sos + 5] + b"\x09" + jpeg[sos + 6 :]


def test_one_batched_call_for_the_jpegs_the_rest_and_the_failures_to_pil():
    nv = Counted()
    prep = Preprocessor(SIZE, 10**8, "cpu", decoder=nv)
    good = [_bytes(_image(i, (64, 64)), quality=95) for i in range(3)]
    broken = _bad_component(_bytes(_image(8, (64, 64)), quality=90))
    png, progressive = _bytes(_image(4), "PNG"), _bytes(_image(5), progressive=True, quality=95)
    cmyk, gray = _bytes(_image(6).convert("CMYK")), _bytes(_image(9).convert("L"), quality=95)
    blobs = [good[0], png, good[1], progressive, broken, cmyk, gray, _bytes(_image(7, (90, 50)), quality=95), good[2]]
    items = [prep.stage(b) for b in blobs]
    assert [isinstance(i, Encoded) for i in items] == [True, False, True, False, True, False, False, True, True]
    pixels, failed = prep.batch(items)
    # one call for the five JPEGs; the one it could not decode came back None, not as an exception: to PIL,
    # which rejects it with the reason the CPU path gives, and no image was decoded twice by nvImageCodec
    assert nv.calls == [5] and prep.fallbacks == 1
    with pytest.raises(BadImage) as cpu:
        decode(broken, SIZE, 10**8)
    assert failed == {4: str(cpu.value)}
    assert pixels.shape == (8, 3, SIZE, SIZE) and pixels.dtype == torch.uint8
    kept = [b for i, b in enumerate(blobs) if i != 4]
    reference = np.stack([decode(b, SIZE, 10**8) for b in kept]).astype(np.int16)
    got = pixels.permute(0, 2, 3, 1).numpy().astype(np.int16)
    for i in (1, 3, 4, 5):  # PNG, progressive, CMYK, grayscale: PIL's pixels exactly
        assert np.array_equal(got[i], reference[i]), i
    for i in (0, 2, 6, 7):  # decoded by nvImageCodec at full size, resized by torch: close to PIL's
        assert np.abs(got[i] - reference[i]).mean() < 6, i


def test_the_same_pixels_as_pil_before_the_resize_and_no_exif_rotation():
    img = _image(2, (48, 32))
    info = Image.Exif()
    info[0x0112] = 6  # orientation: rotate 90° on display; PIL's path does not apply it, so nor may this one
    blob = _bytes(img, quality=95, exif=info.tobytes())
    [chw] = NvImageCodecDecoder("cpu")([torch.frombuffer(bytearray(blob), dtype=torch.uint8)])
    full = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    assert tuple(chw.shape) == (3, 32, 48)  # not rotated to 48 x 32
    assert np.array_equal(chw.permute(1, 2, 0).numpy(), full)  # the same libjpeg-turbo decode as PIL


def test_embed_shard_through_nvimgcodec_on_two_assembly_workers_gives_the_same_vectors(registered, monkeypatch):
    decoders: list[Counted] = []

    def make() -> Counted:
        decoders.append(Counted())
        return decoders[-1]

    # two assembly workers: each thread makes a decoder of its own inside the one NvImageCodecDecoder
    config = EmbedConfig(batch_size=4, chunk_size=8, assembly_workers=2)
    same_ids, cosine = embedded_both_ways(registered, monkeypatch, make, config)
    assert sum(decoders[-1].calls) > 0 and same_ids
    assert cosine.mean() > 0.97, cosine.mean()


def test_it_pickles_without_its_decoders_and_decodes_again_after():
    nv = NvImageCodecDecoder("cpu")
    blob = _bytes(_image(1, (40, 40)), quality=95)
    data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8)]
    first = nv(data)[0]
    copy = pickle.loads(pickle.dumps(Preprocessor(SIZE, 10**8, "cpu", decoder=nv)))
    assert torch.equal(copy._decode_jpeg(data)[0], first)


class _FakeNv:
    """Just enough of nvidia.nvimgcodec for a CUDA decoder's construction (no CUDA here)."""

    class ImageBufferKind:
        STRIDED_DEVICE, STRIDED_HOST = "STRIDED_DEVICE", "STRIDED_HOST"

    class ColorSpec:
        SRGB = "SRGB"

    def __init__(self, buffer_kind):
        self.buffer_kind = buffer_kind
        self.made: list[dict] = []  # each Decoder's arguments

    def DecodeParams(self, **kw):  # noqa: N802 (the library's name)
        return kw

    def Decoder(self, **kw):  # noqa: N802
        self.made.append(kw)
        decoded = None if self.buffer_kind is None else type("Image", (), {"buffer_kind": self.buffer_kind})()
        return type("Decoder", (), {"decode": lambda _self, data, params: decoded})()


@pytest.mark.parametrize("kind", [None, "STRIDED_HOST"])
def test_on_cuda_a_decoder_that_would_decode_on_the_host_is_refused(kind):
    # nvImageCodec without its nvjpeg codec decodes on the CPU: the GPU path would silently measure that
    # refused when it is made: a partition fails at its start, not in an assembly thread mid-batch
    with pytest.raises(ConfigError, match=r"nvimgcodec' on cuda:1: a probe JPEG decoded to .* not to device memory"):
        NvImageCodecDecoder("cuda:1", module=_FakeNv(kind))
    assert NvImageCodecDecoder("cuda:1", module=_FakeNv("STRIDED_DEVICE"))._decoder() is not None


def test_its_host_threads_follow_the_pods_cpus_split_across_assembly_workers(monkeypatch):
    # nvImageCodec's own default is every core of the machine: on a 192-core node, a pod limited to 8 CPUs
    # would get 192 threads per decoder, one decoder per assembly worker
    # the real library takes the setting (on its CPU backend: no GPU here)
    real = NvImageCodecDecoder("cpu", cpu_threads=1)
    blob = _bytes(_image(3, (40, 40)), quality=95)
    assert real([torch.frombuffer(bytearray(blob), dtype=torch.uint8)])[0].shape == (3, 40, 40)
    fake = _FakeNv("STRIDED_DEVICE")
    monkeypatch.setattr("backfill.decode_nvimgcodec.load_nvimgcodec", lambda: fake)
    monkeypatch.setattr("backfill.decode_nvimgcodec.cpu_budget", lambda: 5)
    config = EmbedConfig(device="cuda", gpu_decoder="nvimgcodec", assembly_workers=2, prefetch_batches=1)
    reader = BatchReader([], [], SIZE, config, decode_workers=7)
    reader.close()
    assert fake.made == [{"device_id": 0, "max_num_cpu_threads": 3}]  # 7 decode workers over 2 assemblers
    reader = BatchReader([], [], SIZE, EmbedConfig(device="cuda:1", gpu_decoder="nvimgcodec", assembly_workers=4),
                         decode_workers=2)  # fmt: skip
    reader.close()
    assert fake.made[-1] == {"device_id": 1, "max_num_cpu_threads": 1}  # never 0, which means "all cores"
    assert NvImageCodecDecoder("cuda", module=fake).cpu_threads == 5  # unset: the process's CPU budget
    copy = pickle.loads(pickle.dumps(NvImageCodecDecoder("cuda", module=fake, cpu_threads=2)))
    assert copy.cpu_threads == 2 and fake.made[-1]["max_num_cpu_threads"] == 2  # made again with its threads


def test_asked_for_and_missing_or_misnamed_is_refused_with_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match=r"gpu_decoder must be one of torchvision, nvimgcodec, got 'dali'"):
        EmbedConfig(gpu_decoder="dali")
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"gpu_decoder 'nvimgcodec' needs NVIDIA nvImageCodec.*pip install"):
        load_nvimgcodec()
    # asked for on CUDA: the preprocessor refuses rather than quietly decoding with something else
    with pytest.raises(ConfigError, match="nvImageCodec"):
        Preprocessor(SIZE, 10**8, "cuda", gpu_decoder="nvimgcodec")
