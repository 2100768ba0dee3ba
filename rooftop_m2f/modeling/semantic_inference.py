"""Mask2Former's semantic inference, computed a few queries at a time.

Per pixel, the score of class k is ``sum_q softmax(class_logits_q)[k] * sigmoid(mask_logit_q)``
(no-object dropped), with the mask logits bilinearly upsampled from 1/4 resolution to the padded
input, cropped to the image and, when the caller asks for another output size, resized. Done as
Mask2Former does it, the 100 upsampled masks (400 MB at 1024x1024, float32) are written, copied by
a resize to the same size, read by the sigmoid and read again by the einsum. Here the queries are
taken in chunks of about ``chunk_elements`` upsampled values: each chunk is upsampled, squashed in
place and accumulated into the (K, H, W) scores with one matrix product while it is still in the
cache, and a resize to the size the mask already has is skipped. Same arithmetic per value; only
the order of the sum over queries differs (float32 rounding, ~1e-6 relative).
"""
from typing import Optional, Tuple

import torch
from torch.nn import functional as F

from .resize import resize_maps

# About 16 MB of float32 per chunk on the CPU (fits a last-level cache); on a GPU few big kernels.
CPU_CHUNK_ELEMENTS = 4 * 2**20
CUDA_CHUNK_ELEMENTS = 256 * 2**20


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                    padded_size: Tuple[int, int], image_size: Tuple[int, int],
                    output_size: Tuple[int, int], resize_masks_first: bool = True,
                    chunk_elements: Optional[int] = None) -> torch.Tensor:
    """(K, H_out, W_out) class scores of one image.

    class_logits (Q, K + 1) with the no-object class last; mask_logits (Q, h, w) at the mask
    features' resolution; ``padded_size`` the (H, W) of the padded batch the network saw;
    ``image_size`` the image's (H, W) inside it; ``output_size`` the (H, W) wanted.
    ``resize_masks_first`` is Mask2Former's ``SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE``: resize
    every mask to the output size before the sigmoid (True) or the class scores after (False);
    the two agree when the output size is the image size."""
    if class_logits.dim() != 2 or mask_logits.dim() != 3 or \
            class_logits.shape[0] != mask_logits.shape[0]:
        raise ValueError(f"expected class logits (Q, K+1) and mask logits (Q, h, w) for the same "
                         f"Q; got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}")
    if chunk_elements is None:
        chunk_elements = CUDA_CHUNK_ELEMENTS if mask_logits.is_cuda else CPU_CHUNK_ELEMENTS
    height, width = image_size
    resize_each_mask = resize_masks_first and tuple(output_size) != (height, width)
    size = tuple(output_size) if resize_each_mask else (height, width)

    probs = F.softmax(class_logits.to(mask_logits), dim=-1)[:, :-1]  # (Q, K)
    num_queries, num_classes = probs.shape
    scores = mask_logits.new_zeros(num_classes, size[0] * size[1])
    step = max(1, int(chunk_elements) // max(1, padded_size[0] * padded_size[1]))
    for start in range(0, num_queries, step):
        chunk = mask_logits[start:start + step]
        masks = resize_maps(resize_maps(chunk, padded_size)[:, :height, :width], size)
        # In place only on a tensor the resizes made, never on the model's own output.
        fresh = masks.is_contiguous() and masks.data_ptr() != chunk.data_ptr()
        masks = masks.sigmoid_() if fresh else masks.sigmoid()
        scores.addmm_(probs[start:start + step].t(), masks.reshape(masks.shape[0], -1))
    return resize_maps(scores.view(num_classes, *size), output_size)
