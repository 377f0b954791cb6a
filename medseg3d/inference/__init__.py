"""medseg3d.inference"""
