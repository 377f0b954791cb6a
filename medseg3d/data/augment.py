"""Batched data augmentation in torch (the list in docs/training.md, nnU-Net's probabilities and ranges).

Every transform works on a whole batch at once: `image (B, C, *S)` float32 and `label (B, 1, *S)`
(any integer or float dtype), S 2 or 3 spatial sizes. The spatial part (rotation + scaling, and
the centre crop from an enlarged sampled box to the patch) is one `affine_grid`/`grid_sample` per
batch; per-sample scipy calls (nnU-Net's batchgenerators) cost a process per few patches instead.
Random draws come from a `torch.Generator`, so a seeded worker is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AugmentParams:
    """Probabilities (per sample) and ranges; defaults follow nnU-Net v2's trainer."""

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] = field(default_factory=tuple)
    #: 3D only, nnU-Net's dummy-2D augmentation: rotation about this patch axis alone, scaling and the
    #: low-resolution simulation in the two other axes only (this axis is never resampled). None: 3D.
    dummy_2d_axis: int | None = None

    @property
    def spatial(self) -> bool:
        return self.p_rotation > 0 or self.p_scale > 0


def augment_params_for(patch_size: tuple[int, ...] | list[int], mirror_axes: tuple[int, ...]) -> AugmentParams:
    """nnU-Net v2's rotation/dummy-2D rule (`configure_rotation_dummyDA_mirroring_and_inital_patch_size`).

    2D patches: +-180 degrees, or +-15 when the patch is elongated (longest / shortest edge > 1.5).
    3D patches: +-30 degrees about each axis; when the patch is anisotropic (longest edge more than
    `ANISO_THRESHOLD` x the shortest, `geometry.dummy_2d_axis`) dummy-2D: +-180 degrees about the
    short axis only, scaling and low-resolution simulation in-plane only.
    """
    from medseg3d.geometry import dummy_2d_axis

    patch = [int(p) for p in patch_size]
    if len(patch) == 2:
        return AugmentParams(rotation_deg=15.0 if max(patch) / min(patch) > 1.5 else 180.0,
                             mirror_axes=tuple(mirror_axes))
    axis = dummy_2d_axis(patch)
    return AugmentParams(rotation_deg=30.0 if axis is None else 180.0, mirror_axes=tuple(mirror_axes),
                         dummy_2d_axis=axis)


def no_augmentation() -> AugmentParams:
    """Parameters that leave a batch unchanged (validation batches)."""
    return AugmentParams(p_rotation=0, p_scale=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0,
                         p_lowres=0, p_gamma=0, p_gamma_inverted=0, p_mirror=0, mirror_axes=())


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _chosen(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """`(B, d, d)` rotations: angles `(B,)` (2D) or `(B, 3)` radians about each array axis (3D)."""
    if angles.dim() == 1:
        c, s = torch.cos(angles), torch.sin(angles)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    out = torch.eye(3).repeat(angles.shape[0], 1, 1)
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3).repeat(angles.shape[0], 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
        out = out @ r
    return out


def spatial_transform(image: torch.Tensor, label: torch.Tensor, out_size: tuple[int, ...], params: AugmentParams,
                      g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale about the centre and crop the centre `out_size` from each `(B, C, *S_in)` sample.

    One `grid_sample` per batch (image bilinear, label nearest); the matrices act in voxel units,
    so non-cubic patches are rotated without shear. When no sample is transformed this is a plain
    centre crop.
    """
    b, d = image.shape[0], image.dim() - 2
    in_size = image.shape[2:]
    rot = _chosen(b, params.p_rotation, g)
    scl = _chosen(b, params.p_scale, g)
    if not bool(rot.any() or scl.any()):
        sl = [slice((i - o) // 2, (i - o) // 2 + o) for i, o in zip(in_size, out_size)]
        return image[(Ellipsis, *sl)], label[(Ellipsis, *sl)]
    lim = math.radians(params.rotation_deg)
    angles = _uniform(b * (1 if d == 2 else 3), -lim, lim, g).reshape(b, *(() if d == 2 else (3,)))
    angles = angles * rot.reshape(b, *([1] * (angles.dim() - 1)))
    flat_axis = params.dummy_2d_axis if d == 3 else None
    if flat_axis is not None:  # dummy 2D: rotate about the short axis only
        keep = torch.zeros(3)
        keep[flat_axis] = 1.0
        angles = angles * keep
    a = rotation_matrices(angles)
    scale = torch.where(scl, _uniform(b, *params.scale_range, g), torch.ones(b))
    per_axis = scale.reshape(b, 1).repeat(1, d)
    if flat_axis is not None:  # ... and scale in-plane only
        per_axis[:, flat_axis] = 1.0
    a = a * per_axis.reshape(b, 1, d)
    # voxel units -> normalised grid coordinates of input and output; grid axes are reversed (x = last dim)
    in_t = torch.tensor(in_size, dtype=torch.float32)
    out_t = torch.tensor(out_size, dtype=torch.float32)
    theta = (1.0 / in_t).reshape(1, d, 1) * a * out_t.reshape(1, 1, d)
    theta = theta.flip(1).flip(2)
    theta = torch.cat([theta, torch.zeros(b, d, 1)], dim=2)
    grid = F.affine_grid(theta, [b, 1, *out_size], align_corners=False)
    img = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(label.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img, lab.to(label.dtype)


def gaussian_noise(image: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    b = image.shape[0]
    sel = _chosen(b, params.p_noise, g)
    if not sel.any():
        return image
    std = _uniform(b, *params.noise_variance, g).sqrt() * sel
    noise = torch.randn(image.shape, generator=g)
    return image + noise * std.reshape(b, *([1] * (image.dim() - 1)))


def gaussian_blur(image: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur of the chosen samples, one grouped conv per axis (sigma per sample+channel)."""
    b, c = image.shape[:2]
    d = image.dim() - 2
    idx = torch.nonzero(_chosen(b, params.p_blur, g)).flatten()
    if idx.numel() == 0:
        return image
    n = idx.numel()
    sigma = _uniform(n * c, *params.blur_sigma, g)
    radius = int(math.ceil(3 * params.blur_sigma[1]))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (xs[None] / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (n*c, K)
    x = image[idx].reshape(1, n * c, *image.shape[2:])
    conv = F.conv2d if d == 2 else F.conv3d
    for axis in range(d):
        shape = [n * c, 1] + [1] * d
        shape[2 + axis] = k.shape[1]
        pad = [0] * (2 * d)
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), k.reshape(shape), groups=n * c)
    out = image.clone()
    out[idx] = x.reshape(n, c, *image.shape[2:])
    return out


def _per_sample_channel(x: torch.Tensor, fn) -> torch.Tensor:
    b, c = x.shape[:2]
    return fn(x.reshape(b, c, -1)).reshape(x.shape)


def brightness(image: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    b, c = image.shape[:2]
    sel = _chosen(b, params.p_brightness, g).float()[:, None]
    f = 1 + (_uniform(b * c, *params.brightness_range, g).reshape(b, c) - 1) * sel
    return image * f.reshape(b, c, *([1] * (image.dim() - 2)))


def contrast(image: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    """Scale around the mean of each sample/channel, clipped to its original range."""
    b, c = image.shape[:2]
    sel = _chosen(b, params.p_contrast, g)
    if not sel.any():
        return image
    f = 1 + (_uniform(b * c, *params.contrast_range, g).reshape(b, c, 1) - 1) * sel.float()[:, None, None]
    flat = image.reshape(b, c, -1)
    mean = flat.mean(-1, keepdim=True)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    out = torch.minimum(torch.maximum((flat - mean) * f + mean, lo), hi)
    return out.reshape(image.shape)


def low_resolution(image: torch.Tensor, params: AugmentParams, g: torch.Generator) -> torch.Tensor:
    """Downsample (nearest) by a zoom in `lowres_zoom` and upsample back (linear) for chosen samples."""
    b = image.shape[0]
    d = image.dim() - 2
    idx = torch.nonzero(_chosen(b, params.p_lowres, g)).flatten().tolist()
    if not idx:
        return image
    out = image.clone()
    size = image.shape[2:]
    mode = "bilinear" if d == 2 else "trilinear"
    flat_axis = params.dummy_2d_axis if d == 3 else None
    for i in idx:
        z = float(_uniform(1, *params.lowres_zoom, g))
        small = [s if a == flat_axis else max(1, int(round(s * z))) for a, s in enumerate(size)]
        low = F.interpolate(image[i:i + 1], size=small, mode="nearest")
        out[i:i + 1] = F.interpolate(low, size=tuple(size), mode=mode, align_corners=False)
    return out


def gamma(image: torch.Tensor, params: AugmentParams, g: torch.Generator, p: float, invert: bool) -> torch.Tensor:
    """Gamma on the [0, 1]-rescaled intensities of chosen samples, keeping each one's mean and std."""
    b, c = image.shape[:2]
    sel = _chosen(b, p, g)
    if not sel.any():
        return image
    lo_g, hi_g = params.gamma_range
    # half the draws below 1, half above (nnU-Net's rule)
    below = torch.rand(b * c, generator=g) < 0.5
    gam = torch.where(below, _uniform(b * c, lo_g, 1.0, g), _uniform(b * c, 1.0, hi_g, g)).reshape(b, c, 1)
    flat = image.reshape(b, c, -1)
    x = -flat if invert else flat
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    rng = (hi - lo).clamp_min(1e-7)
    y = ((x - lo) / rng).clamp(0, 1) ** gam * rng + lo
    y = (y - y.mean(-1, keepdim=True)) / y.std(-1, keepdim=True).clamp_min(1e-7) * std + mean
    y = -y if invert else y
    keep = sel.reshape(b, 1, 1)
    return torch.where(keep, y, flat).reshape(image.shape)


def mirror(image: torch.Tensor, label: torch.Tensor, axes: tuple[int, ...], p: float,
           g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each chosen sample along each spatial axis of `axes` (0-based axes of the patch)."""
    b = image.shape[0]
    for axis in axes:
        sel = _chosen(b, p, g)
        if sel.any():
            image = torch.where(sel.reshape(b, *([1] * (image.dim() - 1))), image.flip(2 + axis), image)
            label = torch.where(sel.reshape(b, *([1] * (label.dim() - 1))), label.flip(2 + axis), label)
    return image, label


def augment_batch(image: torch.Tensor, label: torch.Tensor, out_size: tuple[int, ...], params: AugmentParams,
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The full pipeline: `image (B, C, *S_in)`, `label (B, 1, *S_in)` -> `(B, C, *out_size)`, `(B, 1, *out_size)`.

    Order as in nnU-Net: spatial, noise, blur, brightness, contrast, low resolution, gamma
    (inverted, then plain), mirroring.
    """
    image, label = spatial_transform(image, label, tuple(out_size), params, g)
    image = gaussian_noise(image, params, g)
    image = gaussian_blur(image, params, g)
    image = brightness(image, params, g)
    image = contrast(image, params, g)
    image = low_resolution(image, params, g)
    image = gamma(image, params, g, params.p_gamma_inverted, invert=True)
    image = gamma(image, params, g, params.p_gamma, invert=False)
    image, label = mirror(image, label, params.mirror_axes, params.p_mirror, g)
    return image.contiguous(), label.contiguous()
