"""Networks: a registry of plan-driven 2D/3D architectures (`unet`, `vnet`, `resenc_unet`)."""

from medseg3d.networks import resenc_unet as _resenc_unet  # noqa: F401  (registers "resenc_unet")
from medseg3d.networks import unet as _unet  # noqa: F401  (registers "unet")
from medseg3d.networks import vnet as _vnet  # noqa: F401  (registers "vnet")
from medseg3d.networks.registry import build_network, list_architectures, register_architecture

__all__ = ["build_network", "list_architectures", "register_architecture"]
