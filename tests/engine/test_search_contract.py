"""A search query is prepared by the serving version's contract, as its corpus was."""

from __future__ import annotations

import fsspec

from backfill.config import EmbedConfig, IndexConfig
from backfill.embed import embed_shard
from backfill.index import build_index
from backfill.manifest import list_shards, read_shard
from backfill.preprocess import Preprocess
from backfill.publish import publish
from backfill.registry import register_version
from backfill.runtime import load_model
from backfill.search import Searcher
from tests.conftest import MODEL
from tests.engine.test_export import tiny_pt2


def test_a_corpus_image_finds_itself_with_its_stored_vector(layout):
    prep = Preprocess(32, resize="resize_crop", resize_size=48, interpolation="bicubic", channels="BGR")
    card = register_version(layout, MODEL, "v1", tiny_pt2(), dim=16, preprocess=prep)
    model = load_model(layout, card)
    shards = list_shards(layout)
    for shard in shards:
        embed_shard(layout, shard, model, EmbedConfig(torch_threads=1))
    publish(layout, MODEL, build_index(layout, MODEL, "v1", shards, IndexConfig()).build_id)
    manifest = read_shard(layout, shards[0])
    searcher = Searcher(layout, MODEL)
    for image_id, uri in list(zip(manifest.image_ids, manifest.uris))[:5]:
        with fsspec.open(uri, "rb") as f:
            hit = searcher.search_image(f.read(), k=1).hits[0]
        # the same crop, channel order and scaling as at embedding time: the stored vector, up to float16
        assert hit.image_id == image_id and hit.score > 0.999, (image_id, hit)
