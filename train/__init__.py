"""twotower.train"""
