"""medseg3d.networks"""
