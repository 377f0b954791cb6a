"""Networks: a registry of plan-driven 2D/3D architectures (see `medseg3d.networks.registry` for the contract).

U-Net family: `unet`, `resenc_unet`, `vnet`; the seed architectures: `fcn`, `segnet`, `deeplabv3`,
`deeplabv3plus`, `pspnet`.
"""

from medseg3d.networks import deeplab as _deeplab  # noqa: F401  (registers "deeplabv3", "deeplabv3plus")
from medseg3d.networks import fcn as _fcn  # noqa: F401  (registers "fcn")
from medseg3d.networks import pspnet as _pspnet  # noqa: F401  (registers "pspnet")
from medseg3d.networks import resenc_unet as _resenc_unet  # noqa: F401  (registers "resenc_unet")
from medseg3d.networks import segnet as _segnet  # noqa: F401  (registers "segnet")
from medseg3d.networks import unet as _unet  # noqa: F401  (registers "unet")
from medseg3d.networks import vnet as _vnet  # noqa: F401  (registers "vnet")
from medseg3d.networks.registry import (
    ArchOption,
    Architecture,
    build_network,
    get_architecture,
    list_architectures,
    parse_option_args,
    register_architecture,
)

__all__ = ["ArchOption", "Architecture", "build_network", "get_architecture", "list_architectures",
           "parse_option_args", "register_architecture"]
