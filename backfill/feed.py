"""Decoded rows -> model-ready device batches: PIL on the CPU, or nvjpeg on CUDA with a per-image PIL fallback."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backfill.images import BadImage, decode
from backfill.preprocess import Preprocess

# Start-of-frame markers nvjpeg decodes: baseline and extended Huffman. Progressive (0xC2),
# lossless, arithmetic-coded and CMYK/YCCK (4 components) JPEGs go to PIL instead.
_GPU_SOF = (0xC0, 0xC1)
_EOI = b"\xff\xd9"  # end of image: the last two bytes of a complete JPEG
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


_RGB: Any = "RGB"  # torchvision.io.ImageReadMode.RGB once torchvision is imported


def _torchvision_decode_jpeg():
    """torchvision.io.decode_jpeg, or None: torchvision is optional (it cannot sit beside the CPU torch build)."""
    global _RGB
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # ImportError, or a torchvision built for another torch
        return None
    _RGB = ImageReadMode.RGB
    return decode_jpeg


def _gpu_decoder(name: str, device: torch.device, threads: int) -> Callable | None:
    if name == "nvimgcodec":
        from backfill.decode_nvimgcodec import NvImageCodecDecoder  # nvImageCodec: imported only when asked for

        return NvImageCodecDecoder(device, cpu_threads=threads)
    return _torchvision_decode_jpeg()


@dataclass(frozen=True)
class JpegHeader:
    marker: int  # the SOF marker byte
    height: int
    width: int
    components: int
    adobe: bool  # an APP14 "Adobe" segment: colour transform that nvjpeg may read differently than PIL


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG, read without decoding; None if data is not a well-formed JPEG prefix."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, n, adobe = 2, len(data), False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker == 0xEE and data[i + 4 : i + 9] == b"Adobe":
            adobe = True
        if marker in _SOF:
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return JpegHeader(marker, height, width, data[i + 9], adobe)
        i += 2 + length
    return None


@dataclass(frozen=True)
class Encoded:
    """JPEG bytes left for the GPU to decode (the header said nvjpeg can)."""

    data: bytes
    header: JpegHeader


class Preprocessor:
    """Decode and resize images by one model's preprocessing contract on one device.

    `stage(bytes)` runs in the decode worker threads: on the CPU it decodes with PIL
    (at reduced scale, see images.decode); on CUDA with torchvision it only reads the
    JPEG header and passes JPEGs nvjpeg can decode through as `Encoded`, decoding the
    rest (PNG, progressive, CMYK, odd colour transforms) with PIL. `batch(items)` turns
    a list of staged items into one (N, 3, size, size) uint8 tensor on the device: NHWC
    memory (channels-last) on both paths, through pinned memory and a non-blocking copy
    on CUDA, nvjpeg in one batched call; an image nvjpeg fails on is decoded by PIL, so
    its reject reason (or its pixels) is the same as on the CPU path.
    """

    def __init__(
        self,
        size: int | Preprocess,
        max_pixels: int,
        device: str = "cpu",
        gpu_decode: bool = True,
        decoder: Callable | None = None,
        gpu_decoder: str = "torchvision",
        decoder_threads: int = 0,
    ) -> None:
        """`size` is the model's preprocessing contract (a bare input size: squash). `decoder` stands in for
        torchvision.io.decode_jpeg (a test passes a CPU one); by default, on CUDA, `gpu_decoder` names it:
        torchvision's (PIL alone when torchvision is not installed) or nvImageCodec's (decode_nvimgcodec,
        required once asked for). `decoder_threads`: host threads for each of nvImageCodec's decoders (one
        per assembly thread); 0: the process's CPUs."""
        self.prep = Preprocess.of(size)
        self.size = self.prep.input_size
        self.max_pixels = max_pixels
        self.device = torch.device(device)
        if decoder is None and gpu_decode and self.device.type == "cuda":
            decoder = _gpu_decoder(gpu_decoder, self.device, decoder_threads)
        self._decode_jpeg = decoder
        self.gpu_decode = decoder is not None
        self.fallbacks = 0  # images nvjpeg could not decode, decoded by PIL in batch()
        self._count_lock = threading.Lock()  # batch() runs on every assembly worker at once
        self._streams: dict[int, Any] = {}  # thread id -> the CUDA stream that thread assembles batches on

    def prepare(self, span: Any) -> tuple[Any, tuple[torch.Tensor | None, dict[int, str]]]:
        """(span, batch(span.items)) for a pipeline stage; complete on the device when it returns."""
        if not span.items:
            return span, (None, {})
        if self.device.type != "cuda":
            return span, self.batch(span.items)
        stream = self._streams.get(threading.get_ident())
        if stream is None:
            # batches are prepared in worker threads, each on its own CUDA stream, so that nvjpeg and the
            # copy overlap the model's kernels on the default stream (and each other, with several workers)
            stream = self._streams[threading.get_ident()] = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            result = self.batch(span.items)
        # wait here (the worker thread), not in the consumer: the tensor is whole when handed over,
        # and the consumer's default stream is done with it before it is freed (embed ends in .cpu())
        stream.synchronize()
        return span, result

    def __getstate__(self) -> dict:
        # a CUDA stream and a lock do not pickle (Ray and process pools copy the preprocessor)
        return {**self.__dict__, "_streams": {}, "_count_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _count_lock=threading.Lock())

    def stage(self, data: bytes) -> np.ndarray | Encoded:
        """Bytes -> pixels (or Encoded for the GPU); BadImage with a reason on bad input."""
        if self.gpu_decode and data[-2:] == _EOI:
            # only a complete JPEG (ending in the EOI marker) goes to nvjpeg: nvjpeg decodes a
            # truncated one that PIL rejects ("image file is truncated"), and an image must get
            # the same outcome on both paths; anything else (truncated, trailing padding or
            # garbage, a missing EOI) is PIL's to accept or reject
            header = jpeg_header(data)
            if header is not None and header.marker in _GPU_SOF and header.components == 3 and not header.adobe:
                if header.width * header.height > self.max_pixels:
                    declared = f"{header.width}x{header.height}"
                    raise BadImage(f"decompression bomb: declared {declared} exceeds {self.max_pixels} pixels")
                if header.width >= 1 and header.height >= 1:
                    return Encoded(data, header)
        return decode(data, self.prep, self.max_pixels)

    def batch(self, items: list[np.ndarray | Encoded]) -> tuple[torch.Tensor, dict[int, str]]:
        """Staged items -> (pixels (n, 3, size, size) uint8 on the device, {position: reject reason})."""
        failed: dict[int, str] = {}
        encoded = [i for i, item in enumerate(items) if isinstance(item, Encoded)]
        pixels: list[Any] = list(items)
        gpu: dict[int, torch.Tensor] = {}
        if encoded:
            gpu, fallback = self._gpu_decode([items[i] for i in encoded])
            gpu = {encoded[j]: t for j, t in gpu.items()}
            for j in fallback:
                pos = encoded[j]
                with self._count_lock:
                    self.fallbacks += 1
                try:
                    pixels[pos] = decode(items[pos].data, self.prep, self.max_pixels)
                except BadImage as exc:
                    failed[pos] = str(exc)
        keep = [i for i in range(len(items)) if i not in failed]
        # a pad leaves the canvas around a resized image empty: zero once here, not a canvas per image
        blank = torch.zeros if gpu and self.prep.resize == "pad" else torch.empty
        out = blank((len(keep), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        host = [j for j, i in enumerate(keep) if i not in gpu]
        if host:
            stacked = torch.from_numpy(np.stack([pixels[keep[j]] for j in host]))
            if self.device.type == "cuda":
                stacked = stacked.pin_memory().to(self.device, non_blocking=True)
            if len(host) == len(keep):
                out = stacked
            else:
                out[host] = stacked
        if gpu:
            where = {i: j for j, i in enumerate(keep)}
            rows_nchw = out.permute(0, 3, 1, 2)  # a view: what is written through it lands in the NHWC batch
            for positions in _by_shape(gpu).values():
                # the same geometry and interpolation as the PIL path (preprocess.Preprocess), one size at a time
                rows = [where[i] for i in positions]
                group = gpu[positions[0]].unsqueeze(0) if len(rows) == 1 else torch.stack([gpu[i] for i in positions])
                if rows[-1] - rows[0] == len(rows) - 1:  # adjacent (rows ascend, as positions and keep do)
                    # written in place: in a corpus of many sizes nearly every size is alone in its batch, and
                    # each launch per image counts (no stack, no canvas, no index tensor, no scatter)
                    self.prep.apply_tensor(group, into=rows_nchw[rows[0] : rows[0] + len(rows)])
                else:
                    out[rows] = self.prep.apply_tensor(group).permute(0, 2, 3, 1)
        # NHWC memory viewed as NCHW: exactly the channels-last layout, no copy
        return out.permute(0, 3, 1, 2), failed

    def _gpu_decode(self, encoded: list[Encoded]) -> tuple[dict[int, torch.Tensor], list[int]]:
        """nvjpeg on the whole list in one call; on failure, image by image; the rest go to PIL."""
        datas = [torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for e in encoded]
        try:
            decoded = self._decode_jpeg(datas, mode=_RGB, device=self.device)
            if len(decoded) == len(datas):
                return _checked(dict(enumerate(decoded)))
        except Exception:  # one undecodable image fails the batched call; find it
            pass
        good, bad = {}, []
        for j, data in enumerate(datas):
            try:
                good[j] = self._decode_jpeg([data], mode=_RGB, device=self.device)[0]
            except Exception:
                bad.append(j)
        checked, odd = _checked(good)
        return checked, sorted(bad + odd)


def _checked(decoded: dict[int, torch.Tensor | None]) -> tuple[dict[int, torch.Tensor], list[int]]:
    """Keep (3, H, W) results; anything else (None: nvImageCodec could not; a decoder that ignored the mode)
    goes to PIL."""
    good = {j: t for j, t in decoded.items() if t is not None and t.ndim == 3 and t.shape[0] == 3 and t.shape[1] >= 1
            and t.shape[2] >= 1}  # fmt: skip
    return good, [j for j in decoded if j not in good]


def _by_shape(tensors: dict[int, torch.Tensor]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in tensors.items():
        groups.setdefault((int(t.shape[1]), int(t.shape[2])), []).append(i)
    return groups
