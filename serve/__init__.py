"""twotower.serve"""
