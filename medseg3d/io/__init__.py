"""medseg3d.io"""
