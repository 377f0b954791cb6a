"""medseg3d.evaluation"""
