"""embed_shard honours the preprocessing contract: the same vectors as plain PIL resize/crop + the model."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from backfill.config import EmbedConfig
from backfill.efficientnet import DIM, PREPROCESS, Lite0Embedding, pretrained
from backfill.embed import embed_shard, load_embeddings
from backfill.feed import Preprocessor
from backfill.manifest import read_shard, write_shard
from backfill.models import export_bytes
from backfill.preprocess import Preprocess
from backfill.registry import register_version
from backfill.runtime import load_model
from backfill.sample import synthetic_image
from backfill.storage import Layout, Store
from tests.conftest import MODEL

# the real reference model (a random-weight CNN amplifies one-level pixel differences far beyond what a trained
# one does, and the contract is about what the model sees); no importorskip: scripts/setup.sh installs the
# .[models] extra, and a silent skip would hide the contract test

SHARD = "shard-equivalence"
CONTRACTS = {
    "resize_crop-bicubic": PREPROCESS,
    "pad-bilinear-BGR": Preprocess(224, "pad", None, "bilinear", PREPROCESS.mean, PREPROCESS.std, "BGR"),
    "squash": Preprocess(224, mean=PREPROCESS.mean, std=PREPROCESS.std),  # what a card without a contract means
}


def reference_pixels(data: bytes, prep: Preprocess) -> np.ndarray:
    """What the contract says, written out plainly with PIL on the fully decoded image (no draft decoding)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    size, filt = prep.input_size, {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[prep.interpolation]
    w, h = img.size
    if prep.resize == "resize_crop":
        r = prep.resize_size
        nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
        return np.asarray(img.resize((nw, nh), filt).crop((left, top, left + size, top + size)))
    if prep.resize == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img.resize((nw, nh), filt), ((size - nw) // 2, (size - nh) // 2))
        return np.asarray(canvas)
    return np.asarray(img.resize((size, size), filt))


def reference_vectors(model: torch.nn.Module, pixels: np.ndarray, prep: Preprocess) -> np.ndarray:
    x = torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float() / 255
    if prep.channels == "BGR":
        x = x.flip(1)
    x = (x - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return F.normalize(model(x), dim=1).numpy()


@pytest.fixture(scope="module")
def network():
    model = Lite0Embedding(pretrained())
    return model, export_bytes(model, 224)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Layout, list[bytes]]:
    """12 JPEGs in one shard: 8 of the sample corpus's sizes (160-640 px), 4 of 1.3-2.6k px, where the
    decoder takes its reduced-scale (draft) path."""
    layout = Layout(Store.open(str(tmp_path_factory.mktemp("equivalence"))))
    rng = np.random.default_rng(11)
    blobs, uris = [], []
    for i in range(12):
        img = synthetic_image(rng)
        if i >= 8:
            img = img.resize((img.width * 4, img.height * 4), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        uri = layout.store.url("corpus", "images", f"{i:04d}.jpg")
        layout.store.write_bytes(uri, buf.getvalue())
        blobs.append(buf.getvalue())
        uris.append(layout.store.display(uri))
    table = pa.table({"image_id": pa.array(range(12), pa.int64()), "uri": pa.array(uris, pa.string())})
    write_shard(layout, SHARD, table)
    return layout, blobs


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_embed_shard_matches_a_plain_reference_per_image(corpus, network, name):
    layout, blobs = corpus
    model, artifact = network
    prep, version = CONTRACTS[name], f"v-{name}"
    card = register_version(layout, MODEL, version, artifact, dim=DIM, preprocess=prep)
    loaded = load_model(layout, card)
    embed_shard(layout, SHARD, loaded, EmbedConfig(torch_threads=2, chunk_size=8, batch_size=8))
    ids, vectors, valid = load_embeddings(layout, MODEL, version, SHARD)
    assert valid.all() and list(ids) == list(read_shard(layout, SHARD).image_ids)
    expected = reference_vectors(model, np.stack([reference_pixels(b, prep) for b in blobs]), prep)
    cosine = (vectors * expected).sum(1)
    assert cosine.min() >= 0.999, np.round(cosine, 5)


def test_the_gpu_batch_path_matches_the_plain_reference_per_image(corpus, network):
    # nvjpeg's place taken by a full-size PIL decode on the CPU; resize and crop run on tensors, as on CUDA
    def decode_jpeg(datas, mode, device):
        return [torch.from_numpy(np.array(Image.open(io.BytesIO(d.numpy().tobytes())))).permute(2, 0, 1) for d in datas]

    _, blobs = corpus
    model, _ = network
    prep = PREPROCESS
    gpu = Preprocessor(prep, 10**8, "cpu", decoder=decode_jpeg)
    pixels, failed = gpu.batch([gpu.stage(b) for b in blobs])
    assert not failed and gpu.fallbacks == 0
    got = reference_vectors(model, pixels.permute(0, 2, 3, 1).contiguous().numpy(), prep)
    expected = reference_vectors(model, np.stack([reference_pixels(b, prep) for b in blobs]), prep)
    cosine = (got * expected).sum(1)
    assert cosine.min() >= 0.999, np.round(cosine, 5)
