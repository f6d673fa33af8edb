"""Fetch image bytes and turn them into model-ready pixels; bad input becomes a reason, not a crash."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import fsspec
import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from backfill.errors import RetryableError
from backfill.preprocess import Preprocess
from backfill.storage import filesystem_options, protocol_of, transient_errors

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # we enforce our own bound, before decoding, with a reason


try:
    from aiohttp import ClientResponseError

    HTTP_STATUS_ERRORS: tuple[type[BaseException], ...] = (ClientResponseError,)  # http(s):// URIs
except ImportError:
    HTTP_STATUS_ERRORS = ()
RETRYABLE_STATUSES = (408, 425, 429)  # 4xx answers that mean "not now" rather than "never"


class BadImage(Exception):
    """This image cannot be embedded; str(exc) is the reject reason stored with its row.

    Reasons read "<kind>: <detail>"; the kind (before the first colon) is what gets counted.
    """


def make_fetcher() -> Callable[..., bytes]:
    """A fetch function for URIs of any fsspec protocol (filesystems cached per protocol).

    fetch(uri) reads the whole object; fetch(uri, start=a, end=b) the bytes [a, b) in one ranged request
    (members of a tar, backfill/tar.py), shorter if the object ends before b.
    """
    filesystems: dict[str, fsspec.AbstractFileSystem] = {}

    def fetch(uri: str | None, start: int | None = None, end: int | None = None) -> bytes:
        if uri is None or not isinstance(uri, str) or not uri.strip():
            raise BadImage("manifest uri is null or empty")
        protocol = protocol_of(uri)
        if protocol not in filesystems:
            try:
                filesystems[protocol] = fsspec.filesystem(protocol, **filesystem_options(protocol))
            except (ValueError, ImportError) as exc:
                raise BadImage(f"malformed uri: {uri!r} uses unsupported protocol {protocol!r}") from exc
        try:
            return filesystems[protocol].cat_file(uri, start=start, end=end)
        except HTTP_STATUS_ERRORS as exc:
            status = getattr(exc, "status", 0)
            if 400 <= status < 500 and status not in RETRYABLE_STATUSES:
                raise BadImage(f"http {status}: {uri} ({getattr(exc, 'message', exc)})") from None
            raise RetryableError(f"http {status} fetching {uri}: {exc}") from exc
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BadImage(f"missing object: {uri}") from None
        except PermissionError as exc:
            # one unreadable object (or S3's 403 for a missing key) is that image's problem; expired
            # credentials reject every image, and the reject-rate limit fails the partition
            raise BadImage(f"permission denied: {uri} ({exc})") from None
        except transient_errors() as exc:
            raise RetryableError(f"storage unreachable fetching {uri}: {exc}") from exc
        except OSError as exc:
            if "name too long" in str(exc).lower() or "invalid" in str(exc).lower():
                raise BadImage(f"malformed uri: {uri!r} ({exc})") from None
            raise RetryableError(f"storage error fetching {uri}: {exc}") from exc

    return fetch


def decode(data: bytes, size: int | Preprocess, max_pixels: int) -> np.ndarray:
    """Bytes -> (input_size, input_size, 3) uint8 RGB by the contract, decoding JPEGs at reduced scale.

    `size` is a model's Preprocess, or a bare input size (what a card without a contract means: squash,
    decoded as before the contract).
    BadImage on bad input.
    """
    prep = Preprocess.of(size)
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"decompression bomb: declared {width}x{height} exceeds {max_pixels} pixels")
            if width < 1 or height < 1:
                raise BadImage(f"degenerate size {width}x{height}")
            # JPEG: decode at a reduced DCT scale (1/2..1/8: far less work), still >= the contract's margin
            # over the resize target (preprocess.DRAFT)
            img.draft("RGB", prep.draft_size(width, height))
            # the geometry of the image as it is, not as drafted: a reduced decode rounds its size, and the
            # GPU path and a plain full decode take the resize target and crop from the true size
            return prep.apply_pil(_rgb_or_gray(img), prep.geometry(width, height))
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image: format not recognised") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"truncated or corrupt image: {exc}") from None


def _rgb_or_gray(img: Image.Image) -> Image.Image:
    """RGB, or "L" as it is: a grayscale image is made RGB after the resize (Preprocess.apply_pil)."""
    img.seek(0)  # animated formats: the first frame stands for the image
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / peak)).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "L" else img.convert("RGB")
