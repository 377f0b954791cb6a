"""Networks: a registry of plan-driven 2D/3D architectures (see `medseg3d.networks.registry` for the contract).

U-Net family: `unet`, `resenc_unet`, `vnet` (each with the `context` plug-in); the seed
architectures: `fcn`, `segnet`, `deeplabv3`, `deeplabv3plus`, `pspnet`, `fcdensenet`, `dilated`, `hdnet`.
"""

from medseg3d.networks import context as _context
from medseg3d.networks import deeplab as _deeplab
from medseg3d.networks import fcdensenet as _fcdensenet
from medseg3d.networks import fcn as _fcn
from medseg3d.networks import hdnet as _hdnet
from medseg3d.networks import pspnet as _pspnet
from medseg3d.networks import resenc_unet as _resenc_unet
from medseg3d.networks import segnet as _segnet
from medseg3d.networks import unet as _unet
from medseg3d.networks import vnet as _vnet
from medseg3d.networks.registry import (
    Architecture,
    ArchOption,
    build_network,
    get_architecture,
    list_architectures,
    parse_option_args,
    register_architecture,
)

__all__ = ["ArchOption", "Architecture", "build_network", "get_architecture", "list_architectures",
           "parse_option_args", "register_architecture"]
