"""decode_nvimgcodec: NVIDIA nvImageCodec as the GPU path's batched JPEG decoder, in torchvision's decode_jpeg place."""

from __future__ import annotations

import functools
import importlib
import io
import threading
from typing import Any

import numpy as np
import torch

from backfill.errors import ConfigError
from backfill.pipeline import cpu_budget

INSTALL = "pip install 'nvidia-nvimgcodec-cu12[nvjpeg]' (or -cu13 for a CUDA 13 torch)"


def load_nvimgcodec() -> Any:
    """The nvidia.nvimgcodec module, or a ConfigError that says how to install it."""
    try:
        nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
    except ImportError as exc:
        raise ConfigError(f"gpu_decoder 'nvimgcodec' needs NVIDIA nvImageCodec, which is not installed ({exc}): "
                          f"{INSTALL}, or set BACKFILL_GPU_DECODER=torchvision") from None  # fmt: skip
    return nvimgcodec


@functools.cache
def _probe_jpeg() -> bytes:
    """A small baseline JPEG, made here (nothing is downloaded)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 80, 40)).save(out, format="JPEG", quality=90)
    return out.getvalue()


class NvImageCodecDecoder:
    """decode(datas, mode, device) -> [(3, H, W) uint8 tensor, or None where it could not decode], as
    torchvision.io.decode_jpeg is called by feed.Preprocessor: one batched call per list.

    On CUDA the batch is decoded on the calling thread's current stream (each assembly worker's own), and the
    images come back through DLPack without a copy; the decode itself runs outside the GIL. Each thread has a
    Decoder of its own: one Decoder is not safe to share between threads. EXIF orientation is not applied (the
    PIL path does not apply it either: an image must get the same pixels on every path). On the CPU it uses
    nvImageCodec's CPU backend (libjpeg-turbo), which is what the tests run here.
    """

    def __init__(self, device: str | torch.device, module: Any = None, cpu_threads: int = 0) -> None:
        """`cpu_threads`: host threads each Decoder may run (its parsing, and the Huffman decode of the images
        nvjpeg's hybrid back end decodes on the host); 0: the CPUs this process may use (pipeline.cpu_budget).
        Never nvImageCodec's own default, the machine's cores: a pod limited to 8 CPUs on a 192-core node
        would get 192 threads per Decoder, one Decoder per assembly worker."""
        self.device = torch.device(device)
        self.cpu_threads = cpu_threads or cpu_budget()
        if self.cpu_threads < 1:
            raise ConfigError(f"nvimgcodec cpu_threads must be >= 1 (or 0: the process's CPUs), got {cpu_threads}")
        self._nv = module or load_nvimgcodec()
        self._local = threading.local()
        if self.device.type == "cuda":  # once, here: a partition (or a bench) fails at its start, not mid-batch
            self._require_device_decode(self._decoder())

    def _decoder(self) -> Any:
        decoder = getattr(self._local, "decoder", None)
        if decoder is None:
            nv = self._nv
            if self.device.type == "cuda":
                decoder = nv.Decoder(device_id=self.device.index or 0, max_num_cpu_threads=self.cpu_threads)
            else:  # both are needed where there is no GPU driver, else it tries CUDA
                cpu = nv.Backend(nv.BackendKind.CPU_ONLY)
                decoder = nv.Decoder(
                    device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=self.cpu_threads, backends=[cpu]
                )
            self._local.decoder = decoder
            self._local.params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB)
        return decoder

    def _require_device_decode(self, decoder: Any) -> None:
        """Without its nvjpeg codec, nvImageCodec quietly decodes on the CPU into host memory: refuse that."""
        image = decoder.decode(np.frombuffer(_probe_jpeg(), np.uint8), params=self._local.params)
        if image is None or image.buffer_kind != self._nv.ImageBufferKind.STRIDED_DEVICE:
            where = "nothing" if image is None else f"a {image.buffer_kind} image"
            raise ConfigError(f"gpu_decoder 'nvimgcodec' on {self.device}: a probe JPEG decoded to {where}, not to "
                              f"device memory: its nvjpeg codec did not load; {INSTALL}, or set "
                              f"BACKFILL_GPU_DECODER=torchvision")  # fmt: skip

    def __call__(self, datas: list[torch.Tensor], mode: Any = None, device: Any = None) -> list[torch.Tensor | None]:
        decoder = self._decoder()
        blobs = [d.numpy() for d in datas]  # the JPEG bytes, no copy
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            images = decoder.decode(blobs, params=self._local.params, cuda_stream=stream)
            return [None if im is None else torch.from_dlpack(im).permute(2, 0, 1) for im in images]
        images = decoder.decode(blobs, params=self._local.params)
        # a host image has no DLPack export without a driver; numpy's view of it is HWC uint8, no copy
        return [None if im is None else torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images]

    def __getstate__(self) -> dict:
        # Decoders are per thread and per process (Ray and process pools copy the preprocessor): made again there
        return {"device": self.device, "cpu_threads": self.cpu_threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["device"], cpu_threads=state["cpu_threads"])
