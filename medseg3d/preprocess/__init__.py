"""medseg3d.preprocess"""
