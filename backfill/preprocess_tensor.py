"""The tensor path of a preprocessing contract: a batch resized on its device as the PIL path resizes one image."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from backfill.preprocess import INTERPOLATIONS, Preprocess

# filters whose weights can be negative (bicubic's lobes): only their results can leave 0..255 and need a clamp;
# bilinear's weights are a convex combination, nearest copies pixels
_OVERSHOOTS = {"bicubic"}


def apply_tensor(prep: Preprocess, images: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 images of one shape (any device) -> (N, 3, input_size, input_size) uint8.

    `into`: an (N, 3, input_size, input_size) uint8 tensor (a view of a batch's rows, say) the result is written
    into and returned, already zero where a pad leaves the canvas empty. A batch of many image sizes is resized
    one size at a time, so what each one costs in kernel launches is the feeder's cost per image (feed.batch):
    the last pass writes its rounded values straight into `into`, with no uint8 copy or canvas between.
    """
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
                    out = F.interpolate(out, size=size, mode=mode, antialias=True, align_corners=False).round_()
                    if prep.interpolation in _OVERSHOOTS:
                        out = out.clamp_(0, 255)
            # whole numbers in 0..255 now: a float -> uint8 copy is exact
    s = prep.input_size
    if geo.crop is not None:
        left, top = geo.crop
        out = out[:, :, top : top + s, left : left + s]
    if geo.paste is not None:
        left, top = geo.paste
        if into is None:
            into = torch.zeros((len(out), 3, s, s), dtype=torch.uint8, device=out.device)
        into[:, :, top : top + geo.size[1], left : left + geo.size[0]] = out
        return into
    if into is None:
        return out if out.dtype == torch.uint8 else out.to(torch.uint8)
    into.copy_(out)
    return into
