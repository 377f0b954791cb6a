"""medseg3d.plans"""
