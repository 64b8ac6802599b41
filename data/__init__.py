"""twotower.data"""
