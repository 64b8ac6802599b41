"""twotower.towers"""
