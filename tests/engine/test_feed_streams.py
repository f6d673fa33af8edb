"""Batch assembly on CUDA: one stream per assembling thread (several workers overlap), tested with fake streams."""

import pickle
import threading
from types import SimpleNamespace

import torch

from backfill.feed import Preprocessor


class FakeStream:
    made: list["FakeStream"] = []

    def __init__(self, device) -> None:
        self.device, self.synced, self.used = device, 0, 0
        FakeStream.made.append(self)

    def synchronize(self) -> None:
        self.synced += 1


class use:  # torch.cuda.stream(s): a context manager that counts the uses of the stream
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream

    def __enter__(self):
        self.stream.used += 1
        return self.stream

    def __exit__(self, *exc) -> None:
        return None


def test_each_assembling_thread_gets_its_own_stream_and_keeps_it(monkeypatch):
    FakeStream.made = []
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", use)
    prep = Preprocessor(32, 1000, "cuda", gpu_decode=False)  # the device is only named: no CUDA needed
    prep.batch = lambda items: (len(items), {})  # type: ignore[method-assign]
    span = SimpleNamespace(items=[1, 2, 3])
    assert prep.prepare(span) == (span, (3, {}))
    assert prep.prepare(span) == (span, (3, {}))
    assert len(FakeStream.made) == 1 and FakeStream.made[0].synced == 2  # one stream per thread, reused

    both = threading.Barrier(2)

    def other() -> None:
        prep.prepare(span)
        # both alive at once, as assembly workers are: a thread id is reused once its thread has ended (the
        # test once ran them one after the other, and the second got the first's id and stream in CI)
        both.wait(timeout=30)

    threads = [threading.Thread(target=other) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(FakeStream.made) == 3 and all(s.used == s.synced for s in FakeStream.made)
    del prep.batch  # the stand-in above does not pickle
    assert not pickle.loads(pickle.dumps(prep))._streams  # streams do not travel to another process


def test_an_empty_span_needs_no_stream(monkeypatch):
    FakeStream.made = []
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    prep = Preprocessor(32, 1000, "cuda", gpu_decode=False)
    span = SimpleNamespace(items=[])
    assert prep.prepare(span) == (span, (None, {})) and not FakeStream.made
