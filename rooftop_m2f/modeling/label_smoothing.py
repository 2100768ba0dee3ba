"""Label smoothing of Mask2Former's classification loss (``ROOFTOP.LABEL_SMOOTHING``).

For a query matched to a ground-truth segment of class ``y`` the target distribution over the
``K = num_classes + 1`` outputs (the last is no-object) is ``(1 - eps)`` on ``y`` plus ``eps / K``
on every output, so its loss is ``(1 - eps) * (-log p_y) + eps * mean_k(-log p_k)``. An
unmatched query keeps its hard no-object target. The per-query losses are averaged with the
class weights of the query's target (``empty_weight``: the no-object weight for unmatched
queries, ``ROOFTOP.LOSS.PER_CLASS_WEIGHTS`` for the others), exactly as Mask2Former's weighted
cross-entropy does, which it equals for ``eps = 0``.
"""
import torch
import torch.nn.functional as F
from mask2former.modeling.criterion import SetCriterion


def smoothed_cross_entropy(logits, target, smoothed, weight, eps):
    """``logits`` (B, Q, K), ``target`` (B, Q) class indices, ``smoothed`` (B, Q) bool (the
    matched queries), ``weight`` (K,): the weighted mean of the per-query losses (module doc)."""
    log_p = F.log_softmax(logits, dim=-1)
    nll = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    per_query = torch.where(smoothed, (1.0 - eps) * nll + eps * (-log_p.mean(-1)), nll)
    w = weight[target]
    return (w * per_query).sum() / w.sum()


class LabelSmoothingSetCriterion(SetCriterion):
    """Mask2Former's ``SetCriterion`` whose ``loss_labels`` smooths the matched queries' targets."""

    def __init__(self, *args, label_smoothing=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def loss_labels(self, outputs, targets, indices, num_masks):
        logits = outputs["pred_logits"].float()
        idx = self._get_src_permutation_idx(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64,
                            device=logits.device)
        target[idx] = matched_classes
        smoothed = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
        smoothed[idx] = True
        return {"loss_ce": smoothed_cross_entropy(logits, target, smoothed, self.empty_weight,
                                                  self.label_smoothing)}
