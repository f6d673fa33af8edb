"""The preprocessing contract: its geometry, its model.json form, and the PIL and tensor paths agreeing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from backfill.errors import ConfigError, ModelError
from backfill.feed import Preprocessor
from backfill.images import BadImage, decode
from backfill.preprocess import Geometry, Preprocess
from backfill.registry import ModelCard
from tests.engine.test_feed import _bytes

CARD = {"name": "m", "version": "v1", "dim": 8, "input_size": 32, "sha256": "0" * 64, "created": "x"}


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random image (no single-pixel detail: interpolations agree on it closely)."""
    small = np.random.default_rng(seed).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def test_each_resize_mode_places_the_image_as_declared():
    assert Preprocess(224).geometry(640, 480) == Geometry((224, 224))
    crop = Preprocess(224, resize="resize_crop", resize_size=256)
    assert crop.geometry(640, 480) == Geometry((341, 256), crop=(58, 16))  # shorter side 256, centre 224
    assert crop.geometry(480, 640) == Geometry((256, 341), crop=(16, 58))
    assert Preprocess(224, resize="resize_crop").resize_size == 256  # 224 / 0.875
    pad = Preprocess(224, resize="pad")
    assert pad.geometry(640, 480) == Geometry((224, 168), paste=(0, 28))  # longer side 224, centred
    assert pad.geometry(1, 1000) == Geometry((1, 224), paste=(111, 0))


def test_a_card_without_a_contract_means_squash_and_a_contract_round_trips():
    old = ModelCard.from_json(CARD, where="m/v1")
    assert old.preprocess == Preprocess(32, declared=False) and old.format == "torchscript"
    assert "preprocessing" not in old.to_json()  # such a card is rewritten as it was
    prep = Preprocess(32, "resize_crop", 40, "bicubic", (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), "BGR")
    card = ModelCard.from_json({**CARD, **prep.card_fields()}, where="m/v1")
    assert card.preprocess == prep and card.input_size == 32 and card.mean == (0.4, 0.5, 0.6)
    assert ModelCard.from_json(card.to_json(), where="m/v1") == card
    assert card.to_json()["preprocessing"] == {
        "resize": "resize_crop",
        "resize_size": 40,
        "interpolation": "bicubic",
        "channels": "BGR",
    }


@pytest.mark.parametrize(
    "field, message",
    [
        ({"preprocessing": {"resize": "stretch"}}, "preprocessing.resize must be one of squash, resize_crop, pad"),
        ({"preprocessing": {"interpolation": "area"}}, "preprocessing.interpolation must be one of"),
        ({"preprocessing": {"channels": "RGBA"}}, "preprocessing.channels must be one of RGB, BGR"),
        (
            {"preprocessing": {"resize": "resize_crop", "resize_size": 16}},
            r"preprocessing.resize_size must be in 32..128 \(input_size to 4x\), got 16",
        ),
        ({"preprocessing": {"resize_size": 40}}, "preprocessing.resize_size is for resize_crop only"),
        ({"preprocessing": {"crop": 0.9}}, r"preprocessing has unknown fields \['crop'\]"),
        ({"preprocessing": "squash"}, "preprocessing must be an object"),
        ({"normalization": {"mean": [0.5, 0.5]}}, "normalization.mean must be a list of 3 numbers"),
        ({"normalization": {"std": [0.5, 0, 0.5]}}, "normalization.std must be positive"),
    ],
)
def test_a_bad_contract_in_model_json_names_the_field(field, message):
    with pytest.raises(ModelError, match=f"model version at m/v1: model.json {message}"):
        ModelCard.from_json({**CARD, **field}, where="m/v1")


def test_a_bad_contract_built_in_code_is_a_config_error():
    with pytest.raises(ConfigError, match="field 'input_size' must be an integer in 8..4096, got 4"):
        Preprocess(4)


@pytest.mark.parametrize("resize", ["squash", "resize_crop", "pad"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_the_tensor_path_matches_the_pil_path(resize, interpolation):
    prep = Preprocess(32, resize=resize, interpolation=interpolation)
    img = _photo(97, 61)
    pil = prep.apply_pil(img).astype(np.int16)
    tensor = prep.apply_tensor(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None])[0]
    diff = np.abs(tensor.permute(1, 2, 0).numpy().astype(np.int16) - pil)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8
    # the same geometry, filter and rounding: at most a level apart at a few pixels
    assert diff.mean() < 0.05 and diff.max() <= 1, (diff.mean(), diff.max())


def test_decode_applies_the_contract_and_a_bare_size_still_squashes():
    img = _photo(120, 60)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    blob = buf.getvalue()
    squashed = decode(blob, 32, 10**6)
    assert np.array_equal(squashed, np.asarray(img.resize((32, 32), Image.BILINEAR)))
    padded = decode(blob, Preprocess(32, resize="pad"), 10**6)
    assert not padded[:8].any() and not padded[-8:].any() and padded[8:24].any()  # 32x16 image, centred
    cropped = decode(blob, Preprocess(32, resize="resize_crop", resize_size=32), 10**6)
    expected = np.asarray(img.resize((64, 32), Image.BILINEAR).crop((16, 0, 48, 32)))
    assert np.array_equal(cropped, expected)


@pytest.mark.parametrize("resize", ["squash", "resize_crop", "pad"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_a_grayscale_image_is_resized_in_one_channel_with_the_same_pixels(resize, interpolation, monkeypatch):
    prep = Preprocess(32, resize=resize, interpolation=interpolation)
    gray = _photo(150, 90).convert("L")
    blobs = {"PNG": _bytes(gray, "PNG"), "JPEG": _bytes(gray, quality=90)}
    modes: list[str] = []
    resize_ = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda img, *a, **k: modes.append(img.mode) or resize_(img, *a, **k))
    for fmt, blob in blobs.items():
        img = Image.open(io.BytesIO(blob))
        img.draft("RGB", prep.draft_size(*img.size))  # what decode does; a no-op for a PNG
        before = prep.apply_pil(img.convert("RGB"), prep.geometry(150, 90))  # made RGB first, as it was
        modes.clear()
        after = decode(blob, prep, 10**6)
        assert modes == ["L"], fmt  # one channel resized, not three
        assert after.shape == (32, 32, 3) and np.array_equal(after, before), fmt


def test_a_card_without_a_contract_decodes_large_jpegs_exactly_as_before_and_a_declared_one_finer():
    buf = io.BytesIO()
    _photo(1200, 900).save(buf, format="JPEG", quality=90)
    blob = buf.getvalue()
    before = Image.open(io.BytesIO(blob))  # the decoder before the contract: draft to the target itself
    before.draft("RGB", (32, 32))
    expected = np.asarray(before.convert("RGB").resize((32, 32), Image.BILINEAR, reducing_gap=2.0))
    assert np.array_equal(decode(blob, 32, 10**7), expected)
    full = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize((32, 32), Image.BILINEAR)).astype(int)
    declared = decode(blob, Preprocess(32), 10**7).astype(int)
    # the declared contract keeps twice the target before resizing: closer to a full decode
    assert np.abs(declared - full).mean() < np.abs(expected.astype(int) - full).mean()


def test_the_gpu_batch_path_applies_the_contract_like_the_pil_path():
    # a CPU stand-in for nvjpeg: the batch path decodes at full size, then resizes and crops on tensors
    def decode_jpeg(datas, mode, device):
        return [torch.from_numpy(np.array(Image.open(io.BytesIO(d.numpy().tobytes())))).permute(2, 0, 1) for d in datas]

    prep = Preprocess(32, resize="resize_crop", resize_size=40, interpolation="bicubic")
    blobs = []
    for seed, size in enumerate([(90, 50), (50, 90), (90, 50)]):
        buf = io.BytesIO()
        _photo(*size, seed=seed).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    gpu = Preprocessor(prep, 10**8, "cpu", decoder=decode_jpeg)
    pixels, failed = gpu.batch([gpu.stage(b) for b in blobs])
    assert not failed and pixels.shape == (3, 3, 32, 32)
    pil = np.stack([decode(b, prep, 10**8) for b in blobs]).astype(np.int16)
    diff = np.abs(pixels.permute(0, 2, 3, 1).numpy().astype(np.int16) - pil)
    assert diff.mean() < 0.05 and diff.max() <= 1, (diff.mean(), diff.max())


class _Launches(TorchDispatchMode):
    """Counts the ops that run a kernel (on CUDA each one is a launch from the assembly thread); views are free."""

    VIEWS = {"permute", "slice", "unsqueeze", "view", "detach", "lift_fresh", "alias", "select", "expand"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))


def _resized_as_before(prep: Preprocess, image: torch.Tensor) -> torch.Tensor:
    """The tensor path as it was before batches wrote in place (c60e8ff): the pixels it must still give."""
    height, width = image.shape[1:]
    geo, s = prep.geometry(width, height), prep.input_size
    out = image[None]
    if (width, height) != geo.size:
        mode = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}[prep.interpolation]
        if mode == "nearest-exact":
            out = F.interpolate(out, size=(geo.size[1], geo.size[0]), mode=mode)
        else:
            out = out.float()
            for size in ((height, geo.size[0]), (geo.size[1], geo.size[0])):
                if tuple(out.shape[2:]) != size:
                    out = F.interpolate(out, size=size, mode=mode, antialias=True, align_corners=False)
                    out = out.round_().clamp_(0, 255)
            out = out.to(torch.uint8)
    if geo.crop is not None:
        return out[0, :, geo.crop[1] : geo.crop[1] + s, geo.crop[0] : geo.crop[0] + s]
    if geo.paste is not None:
        canvas = torch.zeros((3, s, s), dtype=torch.uint8)
        canvas[:, geo.paste[1] : geo.paste[1] + geo.size[1], geo.paste[0] : geo.paste[0] + geo.size[0]] = out[0]
        return canvas
    return out[0]


def _stand_in_gpu(prep: Preprocess, jpegs: list[bytes], refused: set[bytes] = frozenset()):
    """A Preprocessor whose GPU decoder is a lookup of PIL's full decodes (CHW), giving back None for `refused`,
    so that no op of its own is counted; and those decodes."""
    decoded = {b: torch.from_numpy(np.array(Image.open(io.BytesIO(b)))).permute(2, 0, 1).contiguous() for b in jpegs}

    def decode_jpeg(datas, mode, device):
        return [None if d.numpy().tobytes() in refused else decoded[d.numpy().tobytes()] for d in datas]

    return Preprocessor(prep, 10**8, "cpu", decoder=decode_jpeg), decoded


@pytest.mark.parametrize("resize", ["squash", "resize_crop", "pad"])
@pytest.mark.parametrize("interpolation, launches_per_image", [("bilinear", 6), ("bicubic", 8), ("nearest", 2)])
def test_a_batch_of_many_sizes_costs_a_few_launches_an_image_and_the_same_pixels(
    resize, interpolation, launches_per_image
):
    # a real corpus has nearly as many sizes as images: each is resized alone, so the launches each one costs
    # from the assembly thread are the GPU feeder's cost per image (they were 10-12: a stack, two clamps, a
    # uint8 copy, a canvas, an index tensor and a scatter per size)
    prep = Preprocess(32, resize=resize, interpolation=interpolation)
    sizes = [(90, 50), (50, 90), (90, 50), (32, 32), (61, 47), (120, 33), (47, 61), (33, 120), (77, 77), (40, 70)]
    blobs = [_bytes(_photo(*size, seed=seed), quality=95) for seed, size in enumerate(sizes)]
    gpu, decoded = _stand_in_gpu(prep, blobs)
    items = [gpu.stage(b) for b in blobs]
    counted = _Launches()
    with counted:
        pixels, failed = gpu.batch(items)
    assert not failed and pixels.shape == (10, 3, 32, 32)
    expected = torch.stack([_resized_as_before(prep, decoded[b]) for b in blobs])
    assert torch.equal(pixels, expected)  # bit for bit, rows 0 and 2 (one size, apart) included
    # 9 sizes; the one size twice, in rows 0 and 2, is one group written through an index
    assert counted.count <= 9 * launches_per_image + 4, counted.count


@pytest.mark.parametrize("resize", ["squash", "resize_crop", "pad"])
def test_rows_written_in_place_beside_host_rows_fallbacks_and_rejects(resize):
    # one batch of everything: GPU rows of one size in rows apart, host rows (PNG, grayscale), a JPEG the GPU
    # decoder gives back (PIL decodes it) and one both refuse: each row as the paths give it, a pad's margins zero
    prep = Preprocess(32, resize=resize, interpolation="bilinear")
    good = [
        _bytes(_photo(*size, seed=i), quality=95) for i, size in enumerate([(90, 50), (70, 40), (90, 50), (50, 90)])
    ]
    sos = good[1].index(b"\xff\xda")  # a scan naming a component the frame lacks: no decoder takes it
    broken = good[1][: sos + 5] + b"\x09" + good[1][sos + 6 :]
    png, gray = _bytes(_photo(60, 40, seed=7), "PNG"), _bytes(_photo(40, 60, seed=8).convert("L"), quality=95)
    blobs = [good[0], png, good[1], broken, good[2], gray, good[3]]
    refused = {good[1], broken}  # the stand-in GPU decoder gives these back: PIL's to decode or reject
    gpu, decoded = _stand_in_gpu(prep, good, refused)
    pixels, failed = gpu.batch([gpu.stage(b) for b in blobs])
    with pytest.raises(BadImage) as pil:
        decode(broken, prep, 10**8)
    assert failed == {3: str(pil.value)} and pixels.shape == (6, 3, 32, 32)
    kept = [b for b in blobs if b != broken]
    for row, blob in enumerate(kept):
        if blob in decoded and blob not in refused:  # resized on the "device"
            assert torch.equal(pixels[row], _resized_as_before(prep, decoded[blob])), row
        else:  # PIL's pixels exactly
            assert np.array_equal(pixels[row].permute(1, 2, 0).numpy(), decode(blob, prep, 10**8)), row
    if resize == "pad":
        assert not pixels[0, :, :5].any() and not pixels[0, :, -5:].any()  # 90x50 pasted at 32x18: margins 7


def test_a_jpeg_decoded_at_reduced_scale_takes_its_geometry_from_its_true_size(monkeypatch):
    # 1538x1025 drafts to 769x513 (1/2 scale): the drafted aspect gives a 383-wide resize, the true one 384,
    # which the GPU path and a plain full decode use; the PIL path took the drafted one (a pixel off)
    prep = Preprocess(224, resize="resize_crop", resize_size=256, interpolation="bicubic")
    assert prep.geometry(1538, 1025).size == (384, 256) and prep.geometry(769, 513).size == (383, 256)
    buf = io.BytesIO()
    Image.new("RGB", (1538, 1025), (90, 140, 200)).save(buf, "JPEG", quality=90)
    targets = []
    resize = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda img, size, *a, **k: targets.append(size) or resize(img, size, *a, **k)
    )
    out = decode(buf.getvalue(), prep, max_pixels=10**8)
    assert out.shape == (224, 224, 3)
    assert targets == [(384, 256)]
