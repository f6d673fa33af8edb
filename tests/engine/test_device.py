"""The one CUDA check: a GPU device without CUDA is refused naming who asked and the fix."""

import pytest

from backfill import device
from backfill.errors import ConfigError


def test_cpu_needs_nothing(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert device.require_device("cpu", "pool 'cpu-tidal' runs its steps", "unused") == "cpu"


def test_cuda_without_cuda_is_refused_naming_who_asked_and_the_fix(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"pool 'gpu-spot' runs its steps on cuda:1, but CUDA is not available .*: use a cpu pool"
    ):
        device.require_device("cuda:1", "pool 'gpu-spot' runs its steps", "use a cpu pool")


def test_cuda_with_cuda_is_kept(monkeypatch):
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert device.require_device("cuda", "model m version v was asked to run", "unused") == "cuda"
