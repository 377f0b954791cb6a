"""medseg3d.data"""
