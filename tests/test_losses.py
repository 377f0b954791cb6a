"""Losses: hand-computed tables, perfect predictions, ignore label, deep-supervision weights and targets."""

import math

import pytest
import torch

from medseg3d.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    cross_entropy_loss,
    deep_supervision_weights,
    downsample_targets,
    soft_dice_loss,
)

torch.set_num_threads(1)


def _two_class_logits(p_fg: list[float]) -> torch.Tensor:
    """Logits (1, 2, N) whose softmax gives foreground probabilities p_fg."""
    p = torch.tensor(p_fg, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))]).unsqueeze(0)


P = [0.9, 0.6, 0.2, 0.1]
T = torch.tensor([[1, 1, 0, 0]])


def test_dice_hand_computed_foreground_only():
    # TP = 1.5, |P| = 1.8, |R| = 2 -> Dice 3 / 3.8
    loss = soft_dice_loss(_two_class_logits(P), T, smooth=0.0)
    assert loss.item() == pytest.approx(1 - 3 / 3.8, abs=1e-6)


def test_dice_hand_computed_with_background():
    # background: TP = 1.7, |P| = 2.2, |R| = 2 -> 3.4 / 4.2
    loss = soft_dice_loss(_two_class_logits(P), T, include_background=True, smooth=0.0)
    assert loss.item() == pytest.approx(1 - (3 / 3.8 + 3.4 / 4.2) / 2, abs=1e-6)


def test_batch_dice_differs_from_per_sample_as_computed_by_hand():
    logits = torch.cat([_two_class_logits(P), _two_class_logits([0.1] * 4)])
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    per_sample = soft_dice_loss(logits, target, smooth=1e-5).item()
    batch = soft_dice_loss(logits, target, batch_dice=True, smooth=1e-5).item()
    dice_b = 1e-5 / (0.4 + 1e-5)  # empty reference, small prediction: Dice ~ 0
    assert per_sample == pytest.approx(1 - (3 / 3.8 + dice_b) / 2, abs=1e-5)
    assert batch == pytest.approx(1 - 3 / 4.2, abs=1e-5)


def test_cross_entropy_hand_computed():
    expected = -(math.log(0.9) + math.log(0.6) + math.log(0.8) + math.log(0.9)) / 4
    assert cross_entropy_loss(_two_class_logits(P), T).item() == pytest.approx(expected, abs=1e-6)
    assert DiceCELoss(smooth=0.0)(_two_class_logits(P), T).item() == pytest.approx(expected + 1 - 3 / 3.8, abs=1e-6)


def test_perfect_prediction_gives_near_zero_losses():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 6, 5, 4), generator=g)
    logits = 50.0 * torch.nn.functional.one_hot(target, 3).permute(0, 4, 1, 2, 3).float()
    assert soft_dice_loss(logits, target).item() < 1e-4
    assert soft_dice_loss(logits, target.unsqueeze(1), include_background=True, batch_dice=True).item() < 1e-4
    assert cross_entropy_loss(logits, target).item() < 1e-4
    wrong = soft_dice_loss(-logits, target).item()
    assert wrong > 0.9


def test_ignore_label_voxels_count_for_nothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 10, generator=g)
    target = torch.randint(0, 3, (1, 10), generator=g)
    with_ignored = target.clone()
    with_ignored[0, 6:] = 255
    kept = slice(0, 6)
    for fn in (soft_dice_loss, cross_entropy_loss):
        a = fn(logits, with_ignored, ignore_index=255).item()
        b = fn(logits[..., kept], target[..., kept]).item()
        assert a == pytest.approx(b, abs=1e-6), fn.__name__
    assert DiceCELoss(ignore_index=255)(logits, with_ignored).item() == pytest.approx(
        DiceCELoss()(logits[..., kept], target[..., kept]).item(), abs=1e-6)


def test_target_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        soft_dice_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))


def test_deep_supervision_weights():
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    w = deep_supervision_weights(5)
    assert sum(w) == pytest.approx(1.0) and w[-1] == 0.0
    assert all(w[i] == pytest.approx(2 * w[i + 1]) for i in range(3))
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_downsample_targets_is_a_strided_pick():
    target = torch.arange(2 * 8 * 6 * 3).reshape(2, 8, 6, 3)
    full, half, quarter = downsample_targets(target.unsqueeze(1), [(8, 6, 3), (4, 3, 3), (2, 2, 3)])
    assert torch.equal(full, target)
    assert torch.equal(half, target[:, ::2, ::2, :])
    assert quarter.shape == (2, 2, 2, 3)
    assert torch.equal(quarter, target[:, ::4][:, :, [0, 3]])  # 6 -> 2: floor(i * 6 / 2) = 0, 3
    assert quarter.dtype == target.dtype


def test_deep_supervision_loss_matches_manual_weighted_sum():
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 3, (2, 8, 8, 4), generator=g)
    outs = [torch.randn(2, 3, 8, 8, 4, generator=g, requires_grad=True),
            torch.randn(2, 3, 4, 4, 4, generator=g, requires_grad=True),
            torch.randn(2, 3, 2, 2, 2, generator=g, requires_grad=True)]
    base = DiceCELoss()
    loss = DeepSupervisionLoss(base)(outs, target.unsqueeze(1))
    manual = 2 / 3 * base(outs[0], target) + 1 / 3 * base(outs[1], target[:, ::2, ::2, :])
    assert loss.item() == pytest.approx(manual.item(), abs=1e-6)
    loss.backward()
    assert outs[0].grad.abs().sum() > 0 and outs[1].grad.abs().sum() > 0
    assert outs[2].grad is None  # weight 0: not evaluated
    single = DeepSupervisionLoss(base)(outs[0], target)
    assert single.item() == pytest.approx(base(outs[0], target).item(), abs=1e-6)


def test_losses_accept_bf16_logits():
    logits = torch.randn(1, 3, 4, 4, 4).to(torch.bfloat16)
    target = torch.randint(0, 3, (1, 4, 4, 4))
    loss = DiceCELoss()(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_unet_with_deep_supervision_loss_learns_a_synthetic_ball():
    from medseg3d.networks import build_network

    torch.manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    target = (((grid - 7.5) ** 2).sum(0) < 25).long().unsqueeze(0).repeat(2, 1, 1, 1)  # (2, 16, 16, 16)
    image = target.unsqueeze(1).float() + 0.3 * torch.randn(2, 1, 16, 16, 16)
    net = build_network("unet", in_channels=1, num_classes=2, dims=3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                        kernel_sizes=[[3, 3, 3]] * 3, features=[4, 8, 16]).train()
    loss_fn = DeepSupervisionLoss(DiceCELoss())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(net(image), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    net.eval()
    with torch.no_grad():
        pred = net(image).argmax(1)
    dice = 2 * ((pred == 1) & (target == 1)).sum() / ((pred == 1).sum() + (target == 1).sum())
    assert dice > 0.9
