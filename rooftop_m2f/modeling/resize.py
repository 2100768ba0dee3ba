"""Bilinear resizing of score and feature maps, as Mask2Former resizes them
(``F.interpolate(..., mode="bilinear", align_corners=False)``)."""
from typing import Sequence

import torch
from torch.nn import functional as F


def resize_maps(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize the last two dimensions of a 3-D (C, H, W) or 4-D (B, C, H, W) tensor to
    ``size`` = (H', W'); ``x`` itself when it already has that size. A contiguous tensor is
    resized as B*C one-channel maps: the same arithmetic per value, and PyTorch's CPU kernel
    shrinks a many-channel tensor much more slowly than the same data seen that way."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.is_contiguous():
        maps = x.reshape(-1, 1, *x.shape[-2:])
        out = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        return out.view(*x.shape[:-2], *size)
    # e.g. a crop, or channels-last features (on which the kernel is fast as it is)
    batch = x if x.dim() == 4 else x[None]
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    return out if x.dim() == 4 else out[0]
