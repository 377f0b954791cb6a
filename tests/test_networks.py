"""Networks: output contract for odd anisotropic 3D and 2D plans, gradients, registry errors, nnU-Net parity."""

import pytest
import torch

from medseg3d.errors import ConfigError
from medseg3d.networks import build_network, list_architectures

torch.set_num_threads(1)

ARCHS = ["unet", "vnet", "resenc_unet"]
# odd, anisotropic 3D plan: the last axis is coarse (kernel 1, not pooled at first)
PLAN_3D = {"dims": 3, "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2], [1, 2, 2]],
               "kernel_sizes": [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]], "features": [4, 8, 12, 16]}
PATCH_3D = (16, 24, 12)
PLAN_2D = {"dims": 2, "strides": [[1, 1], [2, 2], [2, 1]], "kernel_sizes": [[3, 3], [3, 3], [3, 1]], "features": [4, 8, 16]}
PATCH_2D = (20, 12)


def _sizes(patch, strides):
    sizes, cur = [], list(patch)
    for s in strides:
        cur = [a // b for a, b in zip(cur, s)]
        sizes.append(tuple(cur))
    return sizes


def test_registry_lists_the_three_architectures():
    assert set(ARCHS) <= set(list_architectures())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("plan,patch", [(PLAN_3D, PATCH_3D), (PLAN_2D, PATCH_2D)], ids=["3d", "2d"])
def test_output_contract(arch, plan, patch):
    torch.manual_seed(0)
    net = build_network(arch, in_channels=2, num_classes=3, **plan)
    x = torch.randn(2, 2, *patch)
    net.train()
    outs = net(x)
    assert isinstance(outs, list)
    expected = [(2, 3, *s) for s in _sizes(patch, plan["strides"])[:-1]]  # every decoder resolution
    assert [tuple(o.shape) for o in outs] == expected
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *patch)
    plain = build_network(arch, in_channels=2, num_classes=3, deep_supervision=False, **plan).train()
    assert isinstance(plain(x), torch.Tensor)
    plain.load_state_dict(net.state_dict())  # heads exist either way: one state_dict for both
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), out, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(arch):
    torch.manual_seed(0)
    net = build_network(arch, in_channels=1, num_classes=2, **PLAN_3D).train()
    outs = net(torch.randn(2, 1, *PATCH_3D))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_and_channels_last_3d(arch):
    torch.manual_seed(0)
    net = build_network(arch, in_channels=1, num_classes=3, **PLAN_3D).eval()
    x = torch.randn(1, 1, *PATCH_3D)
    with torch.no_grad():
        ref = net(x)
        net_cl = net.to(memory_format=torch.channels_last_3d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net_cl(x.to(memory_format=torch.channels_last_3d))
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_unknown_name_suggests_closest_and_lists_valid():
    with pytest.raises(ConfigError) as err:
        build_network("unte", in_channels=1, num_classes=2, **PLAN_2D)
    msg = str(err.value)
    assert "'unet'" in msg and "vnet" in msg and "resenc_unet" in msg


@pytest.mark.parametrize("bad", [{"features": [4, 8]}, {"strides": [[1, 1], [2, 2, 2], [2, 1]]}, {"dims": 4}])
def test_inconsistent_arguments_raise_config_error(bad):
    with pytest.raises(ConfigError):
        build_network("unet", in_channels=1, num_classes=2, **{**PLAN_2D, **bad})


def test_unet_matches_nnunet_plainconvunet_parameter_count_for_hippocampus():
    # nnU-Net v2's 3d_fullres plan for Task04_Hippocampus: 4 stages, 3x3x3 kernels, features 32..256.
    # 5,603,177 = dynamic_network_architectures PlainConvUNet(1 -> 3 classes) at this plan, counted in
    # the bench environment by benchmarks/bench_networks.py (which re-checks it side by side).
    net = build_network("unet", in_channels=1, num_classes=3, dims=3, strides=[[1, 1, 1]] + [[2, 2, 2]] * 3,
                        kernel_sizes=[[3, 3, 3]] * 4, features=[32, 64, 128, 256])
    assert sum(p.numel() for p in net.parameters()) == 5_603_177


def test_resenc_unet_matches_nnunet_residual_encoder_unet_parameter_count():
    # 268,294 = dynamic_network_architectures ResidualEncoderUNet(2 -> 3 classes, features 8/16/32,
    # n_blocks_per_stage [1, 3, 4], n_conv_per_stage_decoder [1, 1]) at this plan, counted in the bench venv.
    net = build_network("resenc_unet", in_channels=2, num_classes=3, dims=3, strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2]],
                        kernel_sizes=[[3, 3, 1], [3, 3, 3], [3, 3, 3]], features=[8, 16, 32])
    assert sum(p.numel() for p in net.parameters()) == 268_294


def test_vnet_uses_5_kernels_except_on_coarse_axes_and_prelu():
    net = build_network("vnet", in_channels=1, num_classes=2, **PLAN_3D)
    kernels = {m.kernel_size for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.stride == (1, 1, 1)}
    assert (5, 5, 1) in kernels and (5, 5, 5) in kernels and (3, 3, 3) not in kernels
    assert any(isinstance(m, torch.nn.PReLU) for m in net.modules())


def test_instance_norm_equals_torch_instance_norm_in_both_memory_formats():
    from medseg3d.networks.blocks import InstanceNorm

    torch.manual_seed(0)
    ours, ref = InstanceNorm(4), torch.nn.InstanceNorm3d(4, eps=1e-5, affine=True)
    ours.weight.data.uniform_(0.5, 2)
    ours.bias.data.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x = 3 * torch.randn(2, 4, 5, 6, 7) + 1
    assert torch.allclose(ours(x), ref(x), atol=1e-5)
    assert torch.allclose(ours(x.to(memory_format=torch.channels_last_3d)), ref(x), atol=1e-5)


def test_channels_last_instance_norm_gradients_match_autograd():
    """The fused channels-last kernel's backward against torch's autograd (float64 gradcheck)."""
    from medseg3d.networks.blocks import ChannelsLastInstanceNorm

    torch.manual_seed(0)
    x = (2 * torch.randn(2, 3, 4, 5, 3, dtype=torch.float64) + 1).to(memory_format=torch.channels_last_3d)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda *a: ChannelsLastInstanceNorm.apply(*a, 1e-5), args)
    y = ChannelsLastInstanceNorm.apply(*args, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(y, torch.nn.functional.instance_norm(x, weight=w, bias=b, eps=1e-5), atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_channels_last_training_step_equals_contiguous(arch):
    """Same loss and gradients whether the network and batch are channels_last_3d or contiguous."""
    torch.manual_seed(0)
    net = build_network(arch, in_channels=1, num_classes=3, **PLAN_3D).train()
    x = torch.randn(2, 1, *PATCH_3D)
    grads, outputs = [], []
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        net = net.to(memory_format=fmt)
        net.zero_grad()
        outs = net(x.contiguous(memory_format=fmt))
        torch.manual_seed(1)
        loss = sum((o * torch.randn_like(o)).sum() for o in outs)
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        outputs.append(outs[0].detach())
    # Compare the whole vector: conv biases before a norm have a zero gradient in exact arithmetic.
    # Rounding differs between the layouts, and a LeakyReLU input within ~1e-9 of its kink can take
    # the other slope (seen once in 18432 voxels with resenc_unet, 6e-4 relative): 1e-2 allows that
    # and still catches a wrong backward, which is off by O(1).
    g0, g1 = (torch.cat([g.flatten() for g in gs]) for gs in grads)
    assert ((g0 - g1).norm() / g0.norm()).item() < 1e-2
    assert torch.allclose(*outputs, atol=1e-5, rtol=1e-4)
