import os

import pytest

from backfill.errors import RetryableError
from backfill.storage import Store


def test_atomic_write_replaces_whole_file(tmp_path):
    store = Store.open(str(tmp_path))
    store.write_bytes(store.url("a", "b.bin"), b"one")
    store.write_bytes(store.url("a", "b.bin"), b"two")
    assert store.read_bytes(store.url("a", "b.bin")) == b"two"
    assert os.listdir(tmp_path / "a") == ["b.bin"]  # no temporary file left behind


def test_failed_write_leaves_nothing_visible(tmp_path, monkeypatch):
    store = Store.open(str(tmp_path))
    store.write_bytes(store.url("x.bin"), b"old")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(RetryableError, match="could not write .*x.bin: .*No space left"):
        store.write_bytes(store.url("x.bin"), b"new")
    assert store.read_bytes(store.url("x.bin")) == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_a_committed_file_has_the_mode_open_would_give_it(tmp_path, umask, mode):
    # it was 0600 (the temporary file's), so a reader under another uid on a shared volume could not read it
    old = os.umask(umask)
    try:
        store = Store.open(str(tmp_path))
        store.write_bytes(store.url("embeddings", "rows-0-8.parquet"), b"rows")
        store.write_json(store.url("indexes", "CURRENT"), {"build_id": "b"})
    finally:
        os.umask(old)
    for name in ("embeddings/rows-0-8.parquet", "indexes/CURRENT"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
