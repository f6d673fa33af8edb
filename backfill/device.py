"""The one check that a process can run the device it was given: a GPU partition never runs silently on a CPU."""

from __future__ import annotations

from backfill.errors import ConfigError


def cuda_available() -> bool:
    import torch  # here, not at the top: the deployment code asks before anything else needs torch

    return torch.cuda.is_available()


def require_device(device: str, asked_by: str, fix: str) -> str:
    """`device`, or a ConfigError when it is CUDA and this process has none.

    `asked_by` says who wants it ("pool 'gpu-spot' runs its steps", "model m version v was asked to run"),
    `fix` what the operator should change: "<asked_by> on <device>, but CUDA is not available ...: <fix>".
    """
    if device.startswith("cuda") and not cuda_available():
        raise ConfigError(
            f"{asked_by} on {device}, but CUDA is not available in this process "
            f"(torch.cuda.is_available() is False): {fix}"
        )
    return device
