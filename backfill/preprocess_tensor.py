"""The tensor path of a preprocessing contract: a batch resized on its device as the PIL path resizes one image."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from backfill.preprocess import INTERPOLATIONS, Preprocess


def apply_tensor(prep: Preprocess, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 images of one shape (any device) -> (N, 3, input_size, input_size) uint8."""
    height, width = int(images.shape[2]), int(images.shape[3])
    geo = prep.geometry(width, height)
    out = images
    if (width, height) != geo.size:
        mode = INTERPOLATIONS[prep.interpolation][1]
        if mode == "nearest-exact":
            out = F.interpolate(images, size=(geo.size[1], geo.size[0]), mode=mode)
        else:
            # PIL resizes width then height, rounding to uint8 in between: doing the same keeps the
            # two paths within a pixel level (one float pass differs by ~0.1 level on average)
            out = images.float()
            for size in ((height, geo.size[0]), (geo.size[1], geo.size[0])):
                if tuple(out.shape[2:]) != size:
                    out = F.interpolate(out, size=size, mode=mode, antialias=True, align_corners=False)
                    out = out.round_().clamp_(0, 255)
            out = out.to(torch.uint8)
    s = prep.input_size
    if geo.crop is not None:
        left, top = geo.crop
        return out[:, :, top : top + s, left : left + s]
    if geo.paste is not None:
        left, top = geo.paste
        canvas = torch.zeros((len(out), 3, s, s), dtype=torch.uint8, device=out.device)
        canvas[:, :, top : top + geo.size[1], left : left + geo.size[0]] = out
        return canvas
    return out
