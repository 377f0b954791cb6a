"""medseg3d: self-configuring 3D medical image segmentation (plan, train, predict, evaluate)."""

__version__ = "0.1.0"
