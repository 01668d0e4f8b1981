"""Backbones, the memory bank and the classifier network."""
