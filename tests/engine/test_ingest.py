"""backfill ingest: sources, stable ids, idempotent re-runs, skip reasons, progress and bad input."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from backfill import ingest as ingest_mod
from backfill.cli import main
from backfill.discovery import discover
from backfill.ingest import (
    ALREADY,
    DUPLICATE,
    EMPTY,
    HIDDEN,
    NOT_IMAGE,
    TAR_CUT,
    TAR_EMPTY,
    TAR_HIDDEN,
    TAR_NOT_FILE,
    TAR_NOT_IMAGE,
    TAR_UNREADABLE,
    IngestError,
    Ledger,
    ingest,
    ledger_path,
)
from backfill.manifest import list_shards, read_shard
from backfill.storage import Layout, Store


def _jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _put(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg() if data is None else data)
    return path


def _root(tmp_path: Path) -> Layout:
    return Layout(Store.open(str(tmp_path / "root")))


def _ids_by_uri(layout: Layout) -> dict[str, int]:
    out = {}
    for name in list_shards(layout):
        shard = read_shard(layout, name)
        out.update(zip(shard.uris, shard.image_ids.tolist()))
    return out


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """7 images in nested folders (mixed-case extensions) and 4 files ingest must skip."""
    src = tmp_path / "photos"
    for i in range(5):
        _put(src / "2024" / f"img{i}.jpg")
    _put(src / "2025" / "deep" / "A.JPEG")
    _put(src / "2025" / "B.Png")
    _put(src / "notes.txt", b"not an image")
    _put(src / "2025" / "empty.jpg", b"")
    _put(src / "2024" / "._img0.jpg")  # a macOS resource fork
    _put(src / "2025" / "clip.mov", b"\0" * 10)
    return src


def test_folder_recursive_case_insensitive_with_skip_reasons(tmp_path, photos):
    layout = _root(tmp_path)
    result = ingest(layout, str(photos), shard_size=3)
    assert (result.kind, result.seen, result.new) == ("folder", 11, 7)
    assert result.skipped == {NOT_IMAGE: 2, EMPTY: 1, HIDDEN: 1}
    assert [(n, rows) for n, rows, _, _ in result.shards] == [
        ("ingest-000000", 3),
        ("ingest-000001", 3),
        ("ingest-000002", 1),
    ]
    ids = _ids_by_uri(layout)
    assert sorted(ids.values()) == list(range(7))
    assert str(photos / "2025" / "deep" / "A.JPEG") in ids and str(photos / "2025" / "B.Png") in ids
    assert all(os.path.isabs(u) for u in ids)


def test_rerun_writes_nothing_and_reads_no_manifest(tmp_path, photos, monkeypatch):
    layout = _root(tmp_path)
    ingest(layout, str(photos), shard_size=3)
    before = {n: layout.store.read_bytes(layout.manifest(n)) for n in list_shards(layout)}

    def refuse(*_):
        raise AssertionError("a re-run must read the ledger, not the manifests")

    monkeypatch.setattr(ingest_mod, "read_shard", refuse)
    again = ingest(layout, str(photos), shard_size=3)
    assert (again.new, again.shards, again.skipped[ALREADY]) == (0, [], 7)
    assert {n: layout.store.read_bytes(layout.manifest(n)) for n in list_shards(layout)} == before


def test_ids_never_change_and_only_new_files_become_new_shards(tmp_path, photos):
    layout = _root(tmp_path)
    ingest(layout, str(photos), shard_size=3)
    first = _ids_by_uri(layout)
    old_bytes = {n: layout.store.read_bytes(layout.manifest(n)) for n in list_shards(layout)}
    # new files that sort before, between and after the old ones
    new = [_put(photos / "2023" / "a.jpg"), _put(photos / "2024" / "img2b.jpg"), _put(photos / "2026" / "z.webp")]
    result = ingest(layout, str(photos), shard_size=3)
    assert result.new == 3 and [n for n, *_ in result.shards] == ["ingest-000003"]
    after = _ids_by_uri(layout)
    assert {u: after[u] for u in first} == first
    assert sorted(after[str(p)] for p in new) == [7, 8, 9]  # after every earlier id
    for name, data in old_bytes.items():
        assert layout.store.read_bytes(layout.manifest(name)) == data  # never rewritten


def test_ingested_shards_pass_discovery_with_disjoint_id_ranges(tmp_path, photos):
    layout = _root(tmp_path)
    ingest(layout, str(photos), shard_size=2)
    _put(photos / "later.jpg")
    ingest(layout, str(photos), shard_size=2)
    found = discover(layout, "refcnn", set(), set())
    assert found.skipped == {} and found.unverified == []
    assert found.new_shards == list_shards(layout) and len(found.new_shards) == 5


def test_other_shards_count_their_uris_are_skipped_and_ids_continue(tmp_path):
    # a corpus written without ingest (the sample): its ledger entries are built from the manifests, once
    from tests.conftest import make_layout

    layout = make_layout(tmp_path / "root", images=12, shards=2)
    images = Path(layout.images)
    _put(images / "extra" / "new.jpg")
    result = ingest(layout, str(images))
    assert (result.seen, result.new, result.skipped[ALREADY]) == (13, 1, 12)
    assert result.shards == [("ingest-000000", 1, 12, 12)]
    assert all(layout.store.exists(ledger_path(layout, n)) for n in list_shards(layout))


def test_a_lost_ledger_entry_is_rebuilt_from_its_manifest(tmp_path, photos):
    # a crash between a shard's manifest and its ledger entry: the next run repairs it, re-ingests nothing
    layout = _root(tmp_path)
    ingest(layout, str(photos), shard_size=3)
    os.unlink(ledger_path(layout, "ingest-000001"))
    Path(ledger_path(layout, "ingest-000002")).write_bytes(b"damaged")
    again = ingest(layout, str(photos), shard_size=3)
    assert again.new == 0 and os.path.exists(ledger_path(layout, "ingest-000001"))
    assert ingest_mod._ledger_entry(layout, "ingest-000002")[2].tolist() == [6, 6, 1]  # rewritten whole


def test_text_list_relative_paths_comments_and_duplicates(tmp_path):
    src = tmp_path / "list"
    for name in ("a.jpg", "b.jpg"):
        _put(src / "imgs" / name)
    listing = src / "uris.txt"
    listing.write_text("# my corpus\nimgs/a.jpg\n\nimgs/b.jpg\nimgs/a.jpg\nhttps://example.org/c.jpg\n")
    layout = _root(tmp_path)
    result = ingest(layout, str(listing))
    assert (result.kind, result.seen, result.new, result.skipped) == ("text", 4, 3, {DUPLICATE: 1})
    ids = _ids_by_uri(layout)
    assert ids == {str(src / "imgs" / "a.jpg"): 0, str(src / "imgs" / "b.jpg"): 1, "https://example.org/c.jpg": 2}


def test_csv_with_image_ids_keeps_them_and_later_ids_follow(tmp_path):
    listing = tmp_path / "corpus.csv"
    listing.write_text("uri,image_id,caption\ns3://b/x.jpg,1000,hi\ns3://b/y.jpg,5,there\n")
    layout = _root(tmp_path)
    ingest(layout, str(listing))
    assert _ids_by_uri(layout) == {"s3://b/x.jpg": 1000, "s3://b/y.jpg": 5}
    more = tmp_path / "more.txt"
    more.write_text("s3://b/x.jpg\ns3://b/z.jpg\n")
    result = ingest(layout, str(more))
    assert result.skipped == {ALREADY: 1} and result.shards == [("ingest-000001", 1, 1001, 1001)]


def test_parquet_list(tmp_path):
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": ["s3://b/1.jpg", "s3://b/2.jpg"], "other": [1, 2]}), listing)
    layout = _root(tmp_path)
    result = ingest(layout, str(listing), prefix="batch-2026")
    assert result.kind == "parquet" and [n for n, *_ in result.shards] == ["batch-2026-000000"]
    assert _ids_by_uri(layout) == {"s3://b/1.jpg": 0, "s3://b/2.jpg": 1}


def _img2dataset(folder: Path, shard: str, rows: list[tuple[str, str, str]], tar: bool = False) -> None:
    """What img2dataset --output_format files writes: NNNNN.parquet (key, url, status, ...) + NNNNN/<key>.jpg."""
    keys, urls, statuses = zip(*rows)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"url": list(urls), "caption": [None] * len(rows), "key": list(keys), "status": list(statuses)})
    pq.write_table(table, folder / f"{shard}.parquet")
    if tar:
        (folder / f"{shard}.tar").write_bytes(b"")
        return
    for key, _, status in rows:
        if status == "success":
            _put(folder / shard / f"{key}.jpg")
            (folder / shard / f"{key}.json").write_text("{}")


def test_img2dataset_files_output(tmp_path):
    out = tmp_path / "i2d"
    _img2dataset(
        out, "00000", [("000000000", "https://e.org/a.jpg", "success"), ("000000001", "u", "failed_to_download")]
    )
    _img2dataset(out, "00001", [("000010000", "https://e.org/c.jpg", "success")])
    (out / "00000_stats.json").write_text("{}")
    os.unlink(out / "00001" / "000010000.jpg")  # listed as a success, file gone since
    _img2dataset(out, "00002", [("000020000", "https://e.org/d.jpg", "success")])
    layout = _root(tmp_path)
    result = ingest(layout, str(out))
    assert result.kind == "img2dataset" and result.new == 2
    assert result.skipped == {ingest_mod.NOT_DOWNLOADED: 1, ingest_mod.MISSING: 1}
    table = pq.read_table(layout.manifest("ingest-000000")).to_pydict()
    assert table["uri"] == [str(out / "00000" / "000000000.jpg"), str(out / "00002" / "000020000.jpg")]
    assert table["source_url"] == ["https://e.org/a.jpg", "https://e.org/d.jpg"]
    assert ingest(layout, str(out)).new == 0


def test_img2dataset_webdataset_output_is_refused_with_the_fix(tmp_path):
    out = tmp_path / "i2d"
    _img2dataset(out, "00000", [("000000000", "https://e.org/a.jpg", "success")], tar=True)
    with pytest.raises(IngestError, match="webdataset output.*--output_format files"):
        ingest(_root(tmp_path), str(out))


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (lambda t: str(t / "nowhere"), {}, "'.*nowhere' does not exist"),
        (lambda t: str((t / "void").mkdir() or t / "void"), {}, "is empty: no files listed"),
        (lambda t: str(_put(t / "f.jpg")), {}, "is a file but not a URI list"),
        (
            lambda t: str(_put(t / "c.csv", b"path,id\nx.jpg,1\n")),
            {},
            r"no 'uri' column \(its header: \['path', 'id'\]\)",
        ),
        (
            lambda t: str(_put(t / "c.csv", b"uri,image_id\nx.jpg,one\n")),
            {},
            "line 2: image_id 'one' is not an integer",
        ),
        (lambda t: str(_put(t / "c.csv", b"uri,image_id\nx.jpg,1\ny.jpg,1\n")), {}, "image_id 1 is given twice"),
        (lambda t: str(_put(t / "p.parquet", b"garbage")), {}, "not readable"),
        (lambda t: str(_put(t / "c.csv", b"uri,image_id\nx.jpg,1\ny.jpg,\n")), {}, "for some rows"),
        (lambda t: str(t), {"shard_size": 0}, "shard size must be in 1..10000000, got 0"),
        (lambda t: str(t), {"prefix": "a/b"}, "shard prefix 'a/b' may only use"),
    ],
)
def test_bad_input_names_the_input_and_the_problem(tmp_path, make, options, message):
    source = make(tmp_path)
    with pytest.raises(IngestError, match=message):
        ingest(_root(tmp_path / "out"), source, **options)
    assert not (tmp_path / "out" / "root" / "corpus").exists()


def test_progress_every_n_files_and_at_the_end(tmp_path):
    src = tmp_path / "many"
    for i in range(25):
        _put(src / f"{i:03d}.jpg")
    lines = []
    ticks = iter(range(100))
    ingest(
        _root(tmp_path),
        str(src),
        shard_size=10,
        progress=lambda r, s: lines.append(r.progress_line(s)),
        progress_every=10,
        progress_every_s=1e9,
        clock=lambda: float(next(ticks)),
    )
    assert lines[-1].startswith("25 files seen, 25 new, 0 skipped, 3 shards written")


def test_the_summary_of_many_shards_is_short(tmp_path):
    listing = tmp_path / "uris.txt"
    listing.write_text("".join(f"s3://b/{i}.jpg\n" for i in range(30)))
    text = ingest(_root(tmp_path), str(listing), shard_size=1).describe()
    assert "wrote 30 manifest shards" in text and "... 20 more ..." in text and "ingest-000029" in text
    assert len(text.splitlines()) == 13


def test_ledger_lookup_with_equal_high_halves():
    ledger = Ledger(np.array([1, 5, 5, 5, 9], np.uint64), np.array([0, 1, 2, 3, 0], np.uint64), 0)
    found = ledger.contains(np.array([5, 5, 5, 9, 10, 0], np.uint64), np.array([3, 1, 4, 0, 0, 0], np.uint64))
    assert found.tolist() == [True, True, False, True, False, False]


def test_cli_ingest_prints_a_summary_and_exits_2_on_bad_input(tmp_path, photos, capsys):
    root = str(tmp_path / "root")
    assert main(["--root", root, "ingest", str(photos), "--shard-size", "4"]) == 0
    captured = capsys.readouterr()
    assert "11 files seen, 7 new" in captured.out and "ingest-000001: 3 images, image_id 4..6" in captured.out
    assert "ingest: 11 files seen" in captured.err  # the progress line
    assert main(["--root", root, "ingest", str(tmp_path / "nope")]) == 2
    assert "backfill ingest: error: source" in capsys.readouterr().err
    assert main(["--root", root, "ingest", str(photos), "--shard-size", "-1"]) == 2
    assert "shard size must be in" in capsys.readouterr().err


def test_s3_prefix_into_an_s3_root(s3_root):
    layout = Layout(Store.open(s3_root))
    images = s3_root.rsplit("/", 1)[0] + "/photos"
    store = Store.open(images)
    for i in range(3):
        store.write_bytes(store.url("y", f"{i}.JPG"), _jpeg(i))
    store.write_bytes(store.url("y", "index.html"), b"<html>")
    result = ingest(layout, images, shard_size=2)
    assert (result.kind, result.new, result.skipped) == ("prefix", 3, {NOT_IMAGE: 1})
    ids = _ids_by_uri(layout)
    assert sorted(ids) == [f"{images}/y/{i}.JPG" for i in range(3)] and sorted(ids.values()) == [0, 1, 2]
    store.write_bytes(store.url("x", "new.jpg"), _jpeg(9))
    again = ingest(layout, images, shard_size=2)
    assert (again.new, again.skipped[ALREADY], [n for n, *_ in again.shards]) == (1, 3, ["ingest-000002"])
    with pytest.raises(IngestError, match="URI lists are read from a local file"):
        ingest(layout, images + "/uris.csv")
    with pytest.raises(IngestError, match="no objects under this prefix"):
        ingest(layout, s3_root.rsplit("/", 1)[0] + "/nothing-here")


def test_a_uri_repeated_after_its_shard_was_written_is_still_a_duplicate(tmp_path):
    listing = tmp_path / "uris.txt"
    listing.write_text("".join(f"s3://b/{i % 5}.jpg\n" for i in range(12)))  # 0..4, then repeats
    result = ingest(_root(tmp_path), str(listing), shard_size=1)
    assert (result.new, result.skipped, len(result.shards)) == (5, {DUPLICATE: 7}, 5)


def test_a_uri_pending_in_an_earlier_batch_is_a_duplicate_after_its_shard_flushes_mid_batch(tmp_path):
    # lookups run per batch of 4,096 rows: line 6000 repeats line 0, whose shard (rows 0..4999) is written
    # in the middle of the second batch; the repeat must still be refused, not ingested with a second id
    listing = tmp_path / "uris.txt"
    lines = [f"s3://b/{i}.jpg" for i in range(8192)]
    lines[6000] = lines[0]
    listing.write_text("\n".join(lines) + "\n")
    result = ingest(_root(tmp_path), str(listing), shard_size=5000)
    assert (result.new, result.skipped) == (8191, {DUPLICATE: 1})
    layout = _root(tmp_path)
    uris = [u for name, *_ in result.shards for u in read_shard(layout, name).uris]
    assert len(uris) == len(set(uris)) == 8191


def test_a_file_uri_is_the_same_image_as_its_path(tmp_path):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"not read at ingest")
    listing = tmp_path / "uris.txt"
    listing.write_text(f"{photo}\nfile://{photo}\n")
    result = ingest(_root(tmp_path), str(listing), shard_size=10)
    assert (result.new, result.skipped) == (1, {DUPLICATE: 1})


def test_an_ingested_folder_is_embedded_indexed_and_searchable(tmp_path):
    # the manifests ingest writes are ones the engine reads: embed every shard, build, publish, search
    from backfill.config import EmbedConfig, IndexConfig
    from backfill.embed import embed_shard
    from backfill.index import build_index
    from backfill.publish import publish
    from backfill.runtime import load_model
    from backfill.sample import synthetic_image
    from backfill.search import Searcher
    from tests.conftest import MODEL, register_tiny

    rng = np.random.default_rng(5)
    src = tmp_path / "photos"
    for i in range(60):
        buf = io.BytesIO()
        synthetic_image(rng).save(buf, format="JPEG", quality=90)
        _put(src / f"{i // 20}" / f"{i:03d}.jpg", buf.getvalue())
    layout = _root(tmp_path)
    shards = [name for name, *_ in ingest(layout, str(src), shard_size=25).shards]
    model = load_model(layout, register_tiny(layout, "v1"))
    for shard in shards:
        embed_shard(layout, shard, model, EmbedConfig(torch_threads=1))
    publish(layout, MODEL, build_index(layout, MODEL, "v1", shards, IndexConfig()).build_id)
    query = src / "1" / "033.jpg"
    hit = Searcher(layout, MODEL, cache_dir=str(tmp_path / "cache")).search_image(query.read_bytes(), k=1).hits[0]
    assert (hit.uri, hit.image_id) == (str(query), _ids_by_uri(layout)[str(query)])


def test_a_dangling_symlink_is_skipped_as_unreadable(tmp_path):
    src = tmp_path / "src"
    _put(src / "ok.jpg")
    os.symlink(tmp_path / "gone.jpg", src / "link.jpg")
    result = ingest(_root(tmp_path), str(src))
    assert (result.new, result.skipped) == (1, {ingest_mod.UNREADABLE: 1})


def test_a_given_image_id_that_clashes_is_refused_by_discovery(tmp_path, photos):
    layout = _root(tmp_path)
    ingest(layout, str(photos))
    listing = tmp_path / "more.csv"
    listing.write_text("uri,image_id\ns3://b/new.jpg,3\n")
    ingest(layout, str(listing))
    found = discover(layout, "refcnn", set(), set())
    assert found.new_shards == ["ingest-000000"]
    assert (
        "image_id 3 appears in manifest shards 'ingest-000000' and 'ingest-000001'"
        in found.skipped["shard ingest-000001"]
    )


def test_an_error_late_in_a_list_keeps_the_shards_before_it_and_a_fixed_rerun_continues(tmp_path):
    listing = tmp_path / "c.csv"
    rows = [f"s3://b/{i}.jpg" for i in range(5000)]
    listing.write_text("uri\n" + "\n".join(rows[:4999]) + '\n""\n')  # the last row's uri is empty
    layout = _root(tmp_path)
    with pytest.raises(IngestError, match="line 5001: empty uri"):
        ingest(layout, str(listing), shard_size=1000)
    # the first listing batch (4,096 rows) was written as 4 complete shards; never half a shard
    assert list_shards(layout) == [f"ingest-{n:06d}" for n in range(4)]
    listing.write_text("uri\n" + "\n".join(rows) + "\n")
    result = ingest(layout, str(listing), shard_size=1000)
    assert (result.new, result.skipped) == (1000, {ALREADY: 4000})
    assert result.shards == [("ingest-000004", 1000, 4000, 4999)]


# ---- WebDataset tars ----------------------------------------------------------------------------------------


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar of (name, data) members; data None makes a folder member."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, seed: int) -> list[tuple[str, bytes | None]]:
    return [(f"{key}.jpg", _jpeg(seed)), (f"{key}.json", b"{}"), (f"{key}.cls", b"1")]


def test_tars_in_a_folder_give_a_row_per_image_member_with_its_range(tmp_path):
    src = tmp_path / "wds"
    _tar(src / "shard-000.tar", [("samples", None), *_sample("samples/000", 0), *_sample("samples/001", 1)])
    _tar(src / "shard-001.tar", _sample("002", 2) + [("._002.jpg", b"x"), ("003.jpg", b"")])
    _put(src / "loose.jpg")
    layout = _root(tmp_path)
    result = ingest(layout, str(src), shard_size=2)
    assert (result.kind, result.tars, result.seen, result.new) == ("folder", 2, 13, 4)
    assert result.skipped == {TAR_NOT_IMAGE: 6, TAR_NOT_FILE: 1, TAR_HIDDEN: 1, TAR_EMPTY: 1}
    tar0 = str(src / "shard-000.tar")
    assert _ids_by_uri(layout) == {  # listing order: loose.jpg sorts before the tars
        str(src / "loose.jpg"): 0,
        f"{tar0}#samples/000.jpg": 1,
        f"{tar0}#samples/001.jpg": 2,
        f"{src / 'shard-001.tar'}#002.jpg": 3,
    }
    first, second = (read_shard(layout, name) for name, *_ in result.shards)
    assert first.members.offsets[0] == -1  # the loose file: a plain row in the same shard as members
    blob = (src / "shard-000.tar").read_bytes()
    for shard, row, seed in ((first, 1, 0), (second, 0, 1)):
        offset, size = int(shard.members.offsets[row]), int(shard.members.sizes[row])
        assert blob[offset : offset + size] == _jpeg(seed)
    text = result.describe()
    assert "13 files and tar members seen (2 tars read), 4 new" in text
    assert "skipped        6  tar member: not an image extension" in text


def test_tar_ingest_is_idempotent_and_a_new_tar_only_adds_its_members(tmp_path):
    src = tmp_path / "wds"
    _tar(src / "a.tar", _sample("0", 0) + _sample("1", 1))
    layout = _root(tmp_path)
    ingest(layout, str(src), shard_size=10)
    before = _ids_by_uri(layout)
    again = ingest(layout, str(src), shard_size=10)
    assert (again.new, again.skipped[ALREADY], again.shards, again.tars) == (0, 2, [], 1)
    _tar(src / "b.tar", _sample("0", 5))
    more = ingest(layout, str(src), shard_size=10)
    assert (more.new, more.skipped[ALREADY], [(n, lo, hi) for n, _, lo, hi in more.shards]) == (
        1,
        2,
        [("ingest-000001", 2, 2)],
    )
    after = _ids_by_uri(layout)
    assert {u: after[u] for u in before} == before and after[f"{src / 'b.tar'}#0.jpg"] == 2


def test_a_single_tar_a_repeated_member_a_cut_tar_and_a_file_that_is_no_tar(tmp_path):
    data = _jpeg(3)
    one = _tar(tmp_path / "one.tar", [("a.jpg", data), ("b.jpg", data), ("a.jpg", _jpeg(4))])
    result = ingest(_root(tmp_path), str(one))
    assert (result.kind, result.new, result.skipped) == ("tar", 2, {DUPLICATE: 1})  # the first a.jpg is kept
    cut = tmp_path / "src" / "cut.tar"
    _tar(cut, [("a.jpg", data), ("b.jpg", data)])
    cut.write_bytes(cut.read_bytes()[: 512 * 3 + len(data) // 2 + 512])  # b.jpg's data is cut short
    (tmp_path / "src" / "fake.tar").write_bytes(b"not a tar at all" * 64)
    folder = ingest(_root(tmp_path / "2"), str(tmp_path / "src"))
    assert (folder.new, folder.tars, folder.skipped) == (1, 1, {TAR_CUT: 1, TAR_UNREADABLE: 1})


def test_a_tar_on_s3_is_listed_once_and_its_members_read_by_range(s3_root, tmp_path):
    from backfill.config import EmbedConfig
    from backfill.reader import BatchReader

    store = Store.open(s3_root.rsplit("/", 1)[0] + "/wds")
    images = [_sample(f"{i:03d}", i) for i in range(5)]
    blob = _tar(tmp_path / "x.tar", [m for sample in images for m in sample]).read_bytes()
    store.write_bytes(store.url("x.tar"), blob)
    layout = Layout(Store.open(s3_root))
    tar_uri = store.fs.unstrip_protocol(store.url("x.tar"))
    result = ingest(layout, tar_uri, shard_size=100)
    assert (result.kind, result.new, result.tars, result.skipped) == ("tar", 5, 1, {TAR_NOT_IMAGE: 10})
    shard = read_shard(layout, result.shards[0][0])
    assert shard.uris[0] == f"{tar_uri}#000.jpg"
    config = EmbedConfig(batch_size=5, chunk_size=5, fetch_workers=2, decode_workers=1, torch_threads=1)
    reader = BatchReader(shard.uris, [(0, 5)], 8, config, decode_workers=1, members=shard.members)
    try:
        (span, (pixels, failed)), *_ = list(reader)
    finally:
        reader.close()
    assert (span.offsets, span.rejects, failed, tuple(pixels.shape)) == ([0, 1, 2, 3, 4], [], {}, (5, 3, 8, 8))


def test_an_ingested_tar_embeds_as_its_images_do_as_files_and_search_finds_both(registered, tmp_path):
    from backfill.config import EmbedConfig, IndexConfig
    from backfill.embed import embed_shard, load_embeddings
    from backfill.index import build_index
    from backfill.publish import publish
    from backfill.runtime import load_model
    from backfill.search import Searcher
    from tests.conftest import MODEL

    layout, card = registered
    plain = read_shard(layout, "shard-00000")
    members = [(f"{i:06d}.jpg", Path(u).read_bytes()) for i, u in enumerate(plain.uris)]
    _tar(tmp_path / "wds" / "a.tar", [m for name, data in members for m in ((name, data), (name + ".json", b"{}"))])
    ((name, *_),) = ingest(layout, str(tmp_path / "wds"), shard_size=100).shards
    model = load_model(layout, card)
    config = EmbedConfig(batch_size=4, chunk_size=6, fetch_workers=2, decode_workers=1, torch_threads=1)
    for shard in ("shard-00000", name):
        embed_shard(layout, shard, model, config)
    _, from_files, _ = load_embeddings(layout, MODEL, "v1", "shard-00000")
    ids, from_tar, valid = load_embeddings(layout, MODEL, "v1", name)
    assert valid.all() and np.array_equal(ids, np.arange(60, 80)) and np.array_equal(from_tar, from_files)
    # every vector is there twice: ties make the recall against exact search a matter of tie order
    index_config = IndexConfig(target_recall=0.5)
    publish(layout, MODEL, build_index(layout, MODEL, "v1", ["shard-00000", name], index_config).build_id)
    query = members[7][1]
    hits = Searcher(layout, MODEL, cache_dir=str(tmp_path / "cache")).search_image(query, k=2).hits
    assert {h.uri for h in hits} == {plain.uris[7], f"{tmp_path / 'wds' / 'a.tar'}#000007.jpg"}


def test_cli_ingest_of_a_tar_summarises_tars_and_member_skips(tmp_path, capsys):
    tar = _tar(tmp_path / "a.tar", _sample("0", 0))
    assert main(["--root", str(tmp_path / "root"), "ingest", str(tar)]) == 0
    out = capsys.readouterr().out
    assert "3 files and tar members seen (1 tars read), 1 new" in out and "2  tar member: not an image" in out


# ---- one ingest at a time per root --------------------------------------------------------------------------


def _lock(layout: Layout, **holder) -> str:
    path = layout.store.url(ingest_mod.LEDGER, ingest_mod.LOCK)
    layout.store.write_json(path, {"host": socket.gethostname(), "started": "2026-12-02T00:00:00", **holder})
    return path


def test_a_second_ingest_is_refused_naming_the_holder_and_writes_nothing(tmp_path, photos):
    layout = _root(tmp_path)
    path = _lock(layout, pid=os.getpid())  # a live process on this host holds it
    with pytest.raises(IngestError, match=rf"another ingest is running on this root: {path} is held by .*'pid': "):
        ingest(layout, str(photos))
    assert list_shards(layout) == [] and layout.store.exists(path)  # the holder's lock is left alone


def test_a_lock_left_by_a_crashed_ingest_on_this_host_is_taken_over_and_every_lock_is_released(tmp_path, photos):
    layout = _root(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = _lock(layout, pid=gone.pid)
    assert ingest(layout, str(photos)).new == 7 and not layout.store.exists(path)
    with pytest.raises(IngestError, match="does not exist"):
        ingest(layout, str(tmp_path / "nope"))
    assert not layout.store.exists(path)  # released on an error too
