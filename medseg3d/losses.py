"""Segmentation losses as pure functions under thin modules (nnU-Net's Dice + CE with deep supervision).

Shapes: logits `(B, K, *spatial)` (K classes, background = class 0), integer targets `(B, *spatial)`
or `(B, 1, *spatial)`. Losses are computed in float32 whatever the logits' dtype (bf16/fp16 AMP).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DeepSupervisionLoss",
    "DiceCELoss",
    "HFDLoss",
    "cross_entropy_loss",
    "deep_supervision_weights",
    "downsample_targets",
    "soft_dice_loss",
]


def _target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Integer target `(B, *spatial)` from `(B, *spatial)` or `(B, 1, *spatial)`; shape checked."""
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)}: expected "
                         f"(B, *spatial) or (B, 1, *spatial) with the logits' B and spatial size")
    return target.long()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *, include_background: bool = False,
                   batch_dice: bool = False, smooth: float = 1e-5, ignore_index: int | None = None) -> torch.Tensor:
    """Soft Dice loss `1 - mean_c (2 TP_c + smooth) / (2 TP_c + FP_c + FN_c + smooth)` on softmax probabilities.

    logits `(B, K, *spatial)`; target integer `(B, *spatial)` or `(B, 1, *spatial)`.
    include_background: also average class 0. batch_dice: sum TP/FP/FN over the batch before the
    ratio (one Dice per class) instead of one Dice per sample and class. ignore_index: voxels with
    this label count for no class. Returns a scalar; 0 for a perfect prediction (up to `smooth`).
    """
    tgt = _target(target, logits)
    probs = torch.softmax(logits.float(), dim=1)
    num_classes = probs.shape[1]
    if ignore_index is not None:
        valid = tgt != ignore_index
        tgt = torch.where(valid, tgt, torch.zeros_like(tgt))
        probs = probs * valid.unsqueeze(1)
    onehot = torch.zeros_like(probs).scatter_(1, tgt.unsqueeze(1), 1.0)
    if ignore_index is not None:
        onehot = onehot * valid.unsqueeze(1)
    axes = tuple(range(2, probs.dim()))
    if batch_dice:
        axes = (0,) + axes
    tp = (probs * onehot).sum(axes)
    pred_sum = probs.sum(axes)
    ref_sum = onehot.sum(axes)
    dice = (2 * tp + smooth) / torch.clamp(pred_sum + ref_sum + smooth, min=1e-8)  # 2TP+FP+FN = |P| + |R|
    if not include_background and num_classes > 1:
        dice = dice[..., 1:]
    return 1.0 - dice.mean()


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int | None = None,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean voxel-wise cross-entropy of logits `(B, K, *spatial)` against integer target; ignore_index skipped."""
    tgt = _target(target, logits)
    return F.cross_entropy(logits.float(), tgt, weight=weight,
                           ignore_index=-100 if ignore_index is None else ignore_index)


class DiceCELoss(nn.Module):
    """`weight_dice * soft_dice_loss + weight_ce * cross_entropy_loss` (1:1 by default, nnU-Net's loss)."""

    def __init__(self, *, include_background: bool = False, batch_dice: bool = False, smooth: float = 1e-5,
                 ignore_index: int | None = None, weight_dice: float = 1.0, weight_ce: float = 1.0) -> None:
        super().__init__()
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.ignore_index = ignore_index
        self.weight_dice = weight_dice
        self.weight_ce = weight_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice = soft_dice_loss(logits, target, include_background=self.include_background, batch_dice=self.batch_dice,
                              smooth=self.smooth, ignore_index=self.ignore_index)
        ce = cross_entropy_loss(logits, target, ignore_index=self.ignore_index)
        return self.weight_dice * dice + self.weight_ce * ce


def deep_supervision_weights(n: int) -> list[float]:
    """Weights of `n` deep-supervision outputs (highest resolution first): 1/2^i, the lowest 0, sum 1.

    e.g. n=3 -> [2/3, 1/3, 0]; n=1 -> [1.0].
    """
    if n < 1:
        raise ValueError(f"need at least one output, got n={n}")
    w = [1.0 / 2**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def downsample_targets(target: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Nearest-neighbour copies of an integer target `(B, *patch)` (or `(B, 1, *patch)`) at each spatial shape.

    Output voxel i along an axis of size n_out takes input voxel floor(i * n_in / n_out): for an
    integer factor f that is the strided pick `[::f]` (no interpolation, no max), as nnU-Net does.
    Returns tensors `(B, *shape)` with the target's dtype; the full shape returns the target itself.
    """
    if not shapes:
        return []
    if target.dim() == len(shapes[0]) + 2 and target.shape[1] == 1:
        target = target[:, 0]
    spatial = tuple(target.shape[1:])
    out = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(spatial):
            raise ValueError(f"output shape {shape} and target shape {spatial} differ in dimensionality")
        t = target
        for axis, (n_in, n_out) in enumerate(zip(spatial, shape)):
            if n_in == n_out:
                continue
            if n_in % n_out == 0:
                idx = slice(None, None, n_in // n_out)
                t = t[(slice(None),) * (axis + 1) + (idx,)]
            else:
                index = (torch.arange(n_out, device=t.device) * n_in) // n_out
                t = t.index_select(axis + 1, index)
        out.append(t)
    return out


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of `loss(output_i, target_i)` over deep-supervision outputs.

    forward(outputs, target): outputs is the network's list of logits (highest resolution first) or
    one tensor; target is ONE full-resolution integer tensor `(B, *patch)` or `(B, 1, *patch)`,
    downsampled here to each output's spatial size. weights default to
    `deep_supervision_weights(len(outputs))`; outputs with weight 0 are not evaluated.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outs))
        if len(weights) < len(outs):
            raise ValueError(f"{len(outs)} outputs but only {len(weights)} deep-supervision weights")
        used = [(o, w) for o, w in zip(outs, weights) if w != 0]
        targets = downsample_targets(target, [o.shape[2:] for o, _ in used])
        total = outs[0].new_zeros((), dtype=torch.float32)
        for (o, w), t in zip(used, targets):
            total = total + w * self.loss(o, t)
        return total


class HFDLoss(nn.Module):
    """HDNet's high-dimension feature distance (HFD) loss on the features before a network's head.

    forward(features `(B, C, *s)`, target integer `(B, *S)` or `(B, 1, *S)`; S a multiple of s, the
    target is picked down to s like deep supervision's) -> scalar. Each voxel's feature f and each
    class centre T_p are unit-normalised along C; the voxel's distance to class p is the cosine
    `cos(f, T_p)`, normalised over the classes by a softmax at `temperature`, and the loss is the
    negative log of the normalised distance to the voxel's own class, `-E[log softmax_p(cos / tau)]`
    (the paper's `L_H = -E_x[log D_p(x)]`). Cosine rather than Euclidean: on unnormalised features the
    loss could be lowered by scaling every feature up, which teaches nothing.
    The centres `(K, C)` are buffers, never trained: in train mode each forward first moves them toward
    the batch's class means of f (`T <- momentum * T + (1 - momentum) * mean`, the first batch that holds
    a class sets its centre), summed over ranks under DDP; classes absent from the batch keep theirs.
    """

    def __init__(self, num_classes: int, channels: int, momentum: float = 0.9, temperature: float = 0.1) -> None:
        super().__init__()
        if not 0 <= momentum < 1 or temperature <= 0:
            raise ValueError(f"HFD needs 0 <= momentum < 1 and temperature > 0, got {momentum}, {temperature}")
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.register_buffer("centres", torch.zeros(int(num_classes), int(channels)))
        self.register_buffer("seen", torch.zeros(int(num_classes), dtype=torch.bool))

    @torch.no_grad()
    def update(self, feats: torch.Tensor, target: torch.Tensor) -> None:
        """EMA step of the centres from unit features `(B, C, N)` and labels `(B, N)`."""
        k = self.centres.shape[0]
        onehot = F.one_hot(target.clamp(0, k - 1), k).to(feats.dtype)  # (B, N, K)
        sums = torch.einsum("bcn,bnk->kc", feats, onehot)
        counts = onehot.sum((0, 1))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        present = counts > 0
        means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=1)
        keep = torch.where(self.seen, torch.full_like(counts, self.momentum), torch.zeros_like(counts))[:, None]
        moved = F.normalize(keep * self.centres + (1 - keep) * means, dim=1)
        self.centres.copy_(torch.where(present[:, None], moved, self.centres))
        self.seen |= present

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        (tgt,) = downsample_targets(target, [features.shape[2:]])
        if tgt.shape[0] != features.shape[0] or tuple(tgt.shape[1:]) != tuple(features.shape[2:]):
            raise ValueError(f"target {tuple(target.shape)} does not fit features {tuple(features.shape)}")
        f = F.normalize(features.float().flatten(2), dim=1)  # (B, C, N)
        tgt = tgt.long().flatten(1)  # (B, N)
        if self.training:
            self.update(f.detach(), tgt)
        logits = torch.einsum("bcn,kc->bkn", f, self.centres) / self.temperature
        return F.cross_entropy(logits, tgt.clamp(0, self.centres.shape[0] - 1))
