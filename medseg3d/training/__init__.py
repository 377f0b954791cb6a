"""medseg3d.training"""
