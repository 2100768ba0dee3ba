"""``RooftopMaskedTransformerDecoder``: Mask2Former's masked-attention decoder, with the
attention masks of inference computed at the resolution they are used at.

After every decoder layer Mask2Former predicts the masks of all queries at the mask features'
resolution (1/4 of the input: 256x256 at 1024 px), then bilinearly resizes them to the next
layer's feature level (1/32, 1/16 or 1/8) and thresholds them into that layer's attention mask.
Only the last layer's full-resolution masks are a result; the others feed the auxiliary losses,
which inference does not compute. Mask logits are linear in the mask features (a dot product with
each query's mask embedding) and bilinear resizing is linear too, so resizing the *features* once
per level and taking the dot product there gives the same attention-mask logits at 1/64, 1/16 and
1/4 of the cost. In inference this decoder does that and predicts full-resolution masks for the
last layer only (``aux_outputs`` then carry class logits, with ``pred_masks`` None).

Training, and inference with ``full_masks_every_layer = True`` (e.g. to compare every decoder
output with another implementation), run Mask2Former's code unchanged. Parameters and state-dict
keys are Mask2Former's, so checkpoints of either class load into the other.
"""
from typing import Dict, Optional, Tuple

import torch

from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
)
from mask2former.modeling.transformer_decoder.maskformer_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
)

from .resize import resize_maps


@TRANSFORMER_DECODER_REGISTRY.register()
class RooftopMaskedTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    full_masks_every_layer: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._inference: Optional[Dict] = None

    def forward(self, x, mask_features, mask=None):
        if self.training or self.full_masks_every_layer:
            return super().forward(x, mask_features, mask)
        # Mask2Former's forward calls the prediction heads once for the learnable queries and
        # once after each layer; the last call's masks are the result.
        self._inference = {"calls_left": self.num_layers + 1, "features": {}}
        try:
            out = super().forward(x, mask_features, mask)
            if calls_left := self._inference["calls_left"]:
                raise RuntimeError(
                    f"{type(self).__name__}: Mask2Former's decoder called the prediction heads "
                    f"{self.num_layers + 1 - calls_left} times, expected {self.num_layers + 1}; "
                    "this Mask2Former version is not supported by the inference shortcut (set "
                    "full_masks_every_layer = True)")
        finally:
            self._inference = None
        return out

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size):
        state = self._inference
        if state is None:
            return super().forward_prediction_heads(output, mask_features, attn_mask_target_size)
        state["calls_left"] -= 1
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)

        size: Tuple[int, int] = tuple(int(s) for s in attn_mask_target_size)
        features = state["features"].get(size)
        if features is None:
            features = resize_maps(mask_features, size)
            state["features"][size] = features
        attn_logits = torch.einsum("bqc,bchw->bqhw", mask_embed, features)
        # True = may not attend: predicted probability below 0.5, i.e. sigmoid(logit) < 0.5
        # exactly as Mask2Former thresholds it; one copy per attention head.
        attn_mask = attn_logits.sigmoid().flatten(2).lt(0.5)
        attn_mask = attn_mask.unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)

        outputs_mask = None
        if state["calls_left"] == 0:
            outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        return outputs_class, outputs_mask, attn_mask.detach()
