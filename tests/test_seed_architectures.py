"""The seed architectures (FCN, SegNet, DeepLab v3/v3+, PSPNet, FC-DenseNet, dilated, HDNet) under the contract.

2D and 3D, isotropic and anisotropic plans: output shapes, gradients everywhere, declared training
outputs, options validated with the valid values listed, checkpoint round trip, and a short CPU
training on a synthetic shape that must learn it (Dice > 0.9: a learning test, not a timed one).
"""

from __future__ import annotations

import pytest
import torch

from medseg3d.errors import ConfigError
from medseg3d.inference.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from medseg3d.losses import DeepSupervisionLoss, DiceCELoss
from medseg3d.networks import build_network, get_architecture, list_architectures, parse_option_args
from medseg3d.networks.blocks import BilinearUpsample
from medseg3d.networks.deeplab import atrous_rates
from medseg3d.networks.encoders import dilated_topology
from medseg3d.networks.pspnet import clamp_bins

torch.set_num_threads(1)
SEEDS = ["fcn", "segnet", "deeplabv3", "deeplabv3plus", "pspnet", "fcdensenet", "dilated", "hdnet"]
PLANS = {
    "3d_iso": dict(dims=3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4,
                   features=[4, 8, 16, 16], patch_size=[40, 56, 40]),
    # a coarse third axis: pooled at one stage only, kernel 1 at full resolution
    "3d_aniso": dict(dims=3, strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]],
                     kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]], features=[4, 8, 16, 16],
                     patch_size=[48, 40, 12]),
    "2d": dict(dims=2, strides=[[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 5,
               features=[4, 8, 16, 16, 16], patch_size=[64, 48]),
}


def test_every_seed_architecture_is_registered():
    assert set(SEEDS) <= set(list_architectures())


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("arch", SEEDS)
def test_shapes_gradients_and_declared_outputs(arch, plan):
    p = PLANS[plan]
    torch.manual_seed(0)
    opts = {"preset": "56"} if arch == "fcdensenet" else None  # the smallest preset keeps the test quick
    net = build_network(arch, in_channels=2, num_classes=3, options=opts, **p).train()
    b = 1 if arch == "fcdensenet" and p["dims"] == 3 else 2  # its full-resolution dense blocks: 13 s a 3D step of 2
    x = torch.randn(b, 2, *p["patch_size"])
    out = net(x)
    outs = out if isinstance(out, list) else [out]
    assert len(outs) == len(net.output_weights)
    assert tuple(outs[0].shape) == (b, 3, *p["patch_size"])  # the rest: full (PSPNet's aux) or deep-supervision size
    assert all(tuple(o.shape[:2]) == (b, 3) and all(n % m == 0 for n, m in zip(p["patch_size"], o.shape[2:]))
               for o in outs[1:])
    # every output weighted 1: nnU-Net's deep supervision gives its lowest head weight 0 (a declared choice,
    # tested in test_declared_loss_weights); here every module must be able to receive a gradient
    loss = DeepSupervisionLoss(DiceCELoss(), weights=[1.0] * len(outs))(out, torch.randint(0, 3, (b, *p["patch_size"])))
    loss.backward()
    missing = [n for n, q in net.named_parameters() if q.grad is None or not torch.isfinite(q.grad).all()
               or q.grad.abs().sum() == 0]
    assert not missing, missing
    net.eval()
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (b, 3, *p["patch_size"])


def test_declared_loss_weights():
    p = PLANS["3d_iso"]
    assert build_network("pspnet", in_channels=1, num_classes=2, **p).output_weights == [1.0, 0.4]
    assert build_network("pspnet", in_channels=1, num_classes=2, options={"aux": "false"}, **p).output_weights == [1.0]
    for arch in ("fcn", "segnet", "deeplabv3", "deeplabv3plus", "fcdensenet", "dilated"):
        assert build_network(arch, in_channels=1, num_classes=2, **p).output_weights == [1.0]
    unet = build_network("unet", in_channels=1, num_classes=2, **p)
    assert unet.output_weights == pytest.approx([2 / 3, 1 / 3, 0.0])  # nnU-Net's weights, 3 decoder outputs
    assert build_network("hdnet", in_channels=1, num_classes=2, **p).output_weights == unet.output_weights


def test_options_are_validated_with_the_valid_values_listed():
    p = PLANS["3d_iso"]
    with pytest.raises(ConfigError, match=r"output_stride=4.*valid: 8, 16"):
        build_network("deeplabv3plus", in_channels=1, num_classes=2, options={"output_stride": "4"}, **p)
    with pytest.raises(ConfigError, match=r"no option 'varient'.*Did you mean 'variant'.*Valid options: variant"):
        build_network("fcn", in_channels=1, num_classes=2, options={"varient": "16s"}, **p)
    with pytest.raises(ConfigError, match="valid: 32s, 16s, 8s"):
        build_network("fcn", in_channels=1, num_classes=2, options={"variant": "4s"}, **p)
    with pytest.raises(ConfigError, match=r"Did you mean 'pspnet'.*Valid names: .*segnet"):
        build_network("pspnte", in_channels=1, num_classes=2, **p)
    with pytest.raises(ConfigError, match="key=value"):
        parse_option_args(["output_stride"])
    assert parse_option_args(["output_stride=8", "rates=paper"]) == {"output_stride": "8", "rates": "paper"}
    opts = get_architecture("deeplabv3").resolve_options({"rates": "3,6,9", "output_stride": "8"})
    assert opts["rates"] == [3, 6, 9] and opts["output_stride"] == 8
    assert get_architecture("pspnet").resolve_options({"aux": "no"})["aux"] is False


def test_fcn_variants_fuse_the_named_number_of_levels():
    p = PLANS["3d_iso"]
    counts = {v: len(build_network("fcn", in_channels=1, num_classes=2, options={"variant": v}, **p).scores)
              for v in ("32s", "16s", "8s")}
    assert counts == {"32s": 1, "16s": 2, "8s": 3}


def test_bilinear_upsample_interpolates():
    up = BilinearUpsample(2, 1, [2, 1])  # an axis with factor 1 is left alone
    ramp = torch.arange(8, dtype=torch.float32).reshape(1, 1, 8, 1).expand(1, 1, 8, 3).contiguous()
    y = up(ramp)
    assert tuple(y.shape) == (1, 1, 16, 3)
    inner = y[0, 0, 1:-1, 0]  # linear interpolation of a ramp is a ramp of half the step
    assert torch.allclose(inner[1:] - inner[:-1], torch.full_like(inner[1:], 0.5), atol=1e-5)


def test_segnet_pools_only_where_the_plan_does():
    net = build_network("segnet", in_channels=1, num_classes=2, **PLANS["3d_aniso"])
    assert net.pools == [(2, 2, 1), (2, 2, 2), (2, 2, 1)]


def test_output_stride_rule_and_rates_on_small_maps():
    strides = [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    new, dil = dilated_topology(strides, 8)
    assert new == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [1, 1, 1]]
    assert dil == [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [2, 2, 1]]  # the coarse axis is not dilated
    # a 40x56x40 hippocampus patch at output stride 8: a 5x7x5 map, where 6/12/18 would sample padding only
    assert atrous_rates([5, 7, 5], 8, "auto") == [[1, 1, 1], [2, 3, 2], [3, 4, 3]]
    assert atrous_rates([5, 7, 5], 16, "paper") == [[6] * 3, [12] * 3, [18] * 3]
    assert atrous_rates([33, 33], 16, "auto") == [[6, 6], [12, 12], [18, 18]]  # the paper's map: the paper's rates
    assert clamp_bins([1, 2, 3, 6], [5, 7, 2]) == [[1, 1, 1], [2, 2, 2], [3, 3, 2], [5, 6, 2]]
    net = build_network("deeplabv3", in_channels=1, num_classes=2, options={"output_stride": 8}, **PLANS["3d_iso"])
    assert net.map_size == [5, 7, 5] and net.rates == [[1, 1, 1], [2, 3, 2], [3, 4, 3]]


@pytest.mark.parametrize("arch", SEEDS)
def test_checkpoint_round_trip_predicts_identically(arch, tmp_path):
    p = PLANS["3d_aniso"]
    options = {"pspnet": {"bins": "1,2,4"}, "fcn": {"variant": "16s"}, "deeplabv3plus": {"output_stride": 8},
               "deeplabv3": {"rates": "paper"}, "segnet": {"convs": 1},
               "fcdensenet": {"preset": "56", "checkpoint": "true"}, "dilated": {"module": "large"},
               "hdnet": {"ranges": "3,5", "output_stride": 4}}[arch]
    torch.manual_seed(1)
    net = build_network(arch, in_channels=1, num_classes=3, options=options, **p)
    kwargs = {k: v for k, v in p.items()} | {"options": net.arch_options}
    path = tmp_path / "checkpoint_final.pt"
    save_checkpoint(path, {"plan_hash": "a" * 64, "configuration": "3d_fullres", "architecture": arch,
                           "network_kwargs": kwargs, "in_channels": 1, "num_classes": 3, "model": net.state_dict()})
    again = build_model_from_checkpoint(load_checkpoint(path))
    assert again.arch_options == net.arch_options
    x = torch.randn(1, 1, *p["patch_size"])
    with torch.no_grad():
        assert torch.equal(net.eval()(x), again(x))


def _discs(g: torch.Generator, n: int = 8, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images `(n, 1, size, size)` of one bright disc each and their masks `(n, size, size)`."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.randint(14, size - 14, (n, 2), generator=g)
    r = torch.randint(8, 14, (n,), generator=g)
    mask = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2 <= r[:, None, None] ** 2
    return (mask.float() + 0.5 * torch.randn(n, size, size, generator=g))[:, None], mask.long()


@pytest.mark.parametrize("arch", SEEDS)
def test_learns_a_synthetic_shape(arch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    opts = {"preset": "56", "dropout": 0.0} if arch == "fcdensenet" else None  # the smallest preset: seconds
    net = build_network(arch, in_channels=1, num_classes=2, dims=2, strides=[[1, 1], [2, 2], [2, 2], [2, 2]],
                        kernel_sizes=[[3, 3]] * 4, features=[8, 16, 32, 32], patch_size=[48, 48], options=opts).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    loss_fn = DeepSupervisionLoss(DiceCELoss(), weights=net.output_weights)
    for _ in range(60 if arch == "fcdensenet" else 200):  # FC-DenseNet learns it in fewer (and slower) steps
        x, y = _discs(g)
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    x, y = _discs(torch.Generator().manual_seed(99), 16)
    with torch.no_grad():
        pred = net.eval()(x).argmax(1)
    dice = 2 * ((pred == 1) & (y == 1)).sum() / ((pred == 1).sum() + (y == 1).sum())
    assert float(dice) > 0.9


def test_context_module_is_the_identity_at_initialisation():
    from medseg3d.networks.context import ContextModule, capped_dilation

    torch.manual_seed(0)
    for kind in ("basic", "large"):
        module = ContextModule(3, 6, kind, map_size=[20, 24, 6], kernel=[3, 3, 1])
        x = torch.rand(2, 6, 20, 24, 6)  # a ReLU map: non-negative
        with torch.no_grad():
            assert torch.allclose(module(x), x, atol=1e-6), kind
    assert module.dilations[5] == [16, 16, 1]  # dilation 16 fits 20x24 but the coarse axis has kernel 1
    assert capped_dilation(16, [5, 7, 2], [3, 3, 3]) == [4, 6, 1]
    assert capped_dilation(2, [5, 7, 2], [3, 3, 1]) == [2, 2, 1]


def test_context_plugs_into_the_unet_family():
    p = PLANS["3d_iso"]
    for arch in ("unet", "resenc_unet", "vnet"):
        plain = build_network(arch, in_channels=1, num_classes=2, **p)
        ctx = build_network(arch, in_channels=1, num_classes=2, options={"context": "basic"}, **p).train()
        assert plain.context is None and ctx.context is not None
        extra = {k for k in ctx.state_dict() if k.startswith("context.")}
        assert extra and set(ctx.state_dict()) - extra == set(plain.state_dict())
        outs = ctx(torch.randn(1, 1, *p["patch_size"]))
        sum(o.mean() for o in outs).backward()
        assert all(q.grad is not None for q in ctx.context.parameters())
    with pytest.raises(ConfigError, match="valid: none, basic, large"):
        build_network("unet", in_channels=1, num_classes=2, options={"context": "huge"}, **p)


def test_fcdensenet_checkpointing_gives_the_same_gradients():
    p = PLANS["3d_aniso"]
    torch.manual_seed(3)
    plain = build_network("fcdensenet", in_channels=1, num_classes=3, options={"preset": "56", "checkpoint": "false"},
                          **p).train()
    ckpt = build_network("fcdensenet", in_channels=1, num_classes=3, options={"preset": "56", "checkpoint": "true"},
                         **p).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, *p["patch_size"])
    grads = []
    for net in (plain, ckpt):
        torch.manual_seed(7)  # the same dropout masks; checkpointing replays them in the recomputation
        net(x).square().mean().backward()
        grads.append({n: q.grad.clone() for n, q in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_fcdensenet_presets_scale_to_the_plan():
    from medseg3d.networks.fcdensenet import preset_layers

    assert preset_layers("103", 3) == ([4, 5, 7], 15, 16)
    assert preset_layers("103", 6) == ([4, 5, 7, 10, 12, 12], 15, 16)
    assert preset_layers("56", 4) == ([4, 4, 4, 4], 4, 12)
    net = build_network("fcdensenet", in_channels=1, num_classes=2, options={"preset": "67"}, **PLANS["3d_aniso"])
    assert len(net.down) == 3 and [len(b.layers) for b in net.down] == [5, 5, 5] and net.pools[0] == (2, 2, 1)


def test_hdnet_windows_and_stage_follow_the_plan():
    from medseg3d.networks.hdnet import attention_stage, relation_windows

    assert attention_stage([[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]], 8) == 3  # cumulative 8x8x2
    assert attention_stage([[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], 8) == 3  # not the stride-16 bottleneck
    # a coarse axis with kernel 1 is not pooled across; windows are capped at 2m - 1 and merged when equal
    assert relation_windows([3, 5, 7], [12, 10, 6], [3, 3, 1]) == [(3, 3, 1), (5, 5, 1), (7, 7, 1)]
    assert relation_windows([3, 5, 7, 9], [2, 3, 4], [3, 3, 3]) == [(3, 3, 3), (3, 5, 5), (3, 5, 7)]
    assert relation_windows([4], [9, 9], [3, 3]) == [(5, 5)]  # even ranges round up to odd windows
    net = build_network("hdnet", in_channels=1, num_classes=2, **PLANS["3d_aniso"])
    assert net.context_stage == 3 and net.context.windows == [(3, 3, 3), (5, 5, 5), (7, 7, 7)]  # a 6x5x6 map


def test_hdnet_relations_are_cosines_of_avg_and_max_pooling():
    from medseg3d.networks.hdnet import LocationAwareAttention

    torch.manual_seed(0)
    laa = LocationAwareAttention(2, 16, [(3, 3), (5, 5)], reduction=2).eval()
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        rel = laa.relations(x)
        t = laa.theta(x)
        avg = torch.nn.functional.avg_pool2d(t, 3, 1, 1, count_include_pad=False)
        mx = torch.nn.functional.max_pool2d(t, 5, 1, 2)
    assert tuple(rel.shape) == (2, 4, 9, 7) and rel.abs().max() <= 1 + 1e-5
    assert torch.allclose(rel[:, 0], torch.nn.functional.cosine_similarity(t, avg, dim=1), atol=1e-5)
    assert torch.allclose(rel[:, 3], torch.nn.functional.cosine_similarity(t, mx, dim=1), atol=1e-5)
    const = torch.ones(1, 16, 5, 5)  # a constant map: every point equals its context
    with torch.no_grad():
        assert torch.allclose(laa.relations(const), torch.ones(1, 4, 5, 5), atol=1e-4)


def test_hfd_centres_follow_the_class_means_without_gradient():
    from medseg3d.losses import HFDLoss

    torch.manual_seed(0)
    hfd = HFDLoss(num_classes=3, channels=4, momentum=0.5).train()
    means = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    target = torch.randint(0, 3, (2, 6, 6))
    feats = (means[target].permute(0, 3, 1, 2) + 0.05 * torch.randn(2, 4, 6, 6)).requires_grad_(True)
    hfd.centres.copy_(torch.nn.functional.normalize(torch.randn(3, 4), dim=1))
    hfd.seen.fill_(True)
    before = (hfd.centres - means).norm(dim=1)
    loss = hfd(feats, target)
    after = (hfd.centres - means).norm(dim=1)
    assert (after < before).all()  # each centre moved toward its class mean
    assert not hfd.centres.requires_grad and hfd.centres.grad is None
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    # the first batch holding a class sets its centre; an absent class keeps its centre
    fresh = HFDLoss(num_classes=3, channels=4).train()
    fresh(feats.detach(), torch.zeros_like(target))
    assert fresh.seen.tolist() == [True, False, False] and torch.equal(fresh.centres[1:], torch.zeros(2, 4))
    # lower-resolution features get the target picked down to their size
    assert torch.isfinite(fresh(torch.randn(2, 4, 3, 3), target))


def test_hfd_trains_any_architecture_through_its_classifier():
    from medseg3d.training.aux import FeatureLoss, resolve_aux_loss

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    p = dict(dims=2, strides=[[1, 1], [2, 2], [2, 2], [2, 2]], kernel_sizes=[[3, 3]] * 4, features=[8, 16, 32, 32],
             patch_size=[48, 48])
    hd = build_network("hdnet", in_channels=1, num_classes=2, **p)
    assert resolve_aux_loss(None, None, hd) == ("hfd", 0.1) and resolve_aux_loss("none", None, hd) is None
    net = build_network("fcn", in_channels=1, num_classes=2, **p).train()
    assert resolve_aux_loss(None, None, net) is None and resolve_aux_loss("hfd", 0.5, net) == ("hfd", 0.5)
    with pytest.raises(ConfigError, match="--aux-loss hfd"):
        resolve_aux_loss(None, 0.3, net)
    aux = FeatureLoss(net, "hfd", 0.1, 2, torch.device("cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss()
    for _ in range(200):
        x, y = _discs(g)
        opt.zero_grad()
        (loss_fn(net(x), y) + aux(y)).backward()
        opt.step()
    assert bool(aux.loss.seen.all())
    x, y = _discs(torch.Generator().manual_seed(99), 16)
    with torch.no_grad():
        pred = net.eval()(x).argmax(1)
    assert aux._features is None  # eval forwards are not captured
    dice = 2 * ((pred == 1) & (y == 1)).sum() / ((pred == 1).sum() + (y == 1).sum())
    assert float(dice) > 0.9
    aux.close()
