"""Evaluation: semantic correspondence (PCK on SPair-71k / PF-Pascal), descriptors, feature caches, presets.

Submodules are imported on demand (``from cleandift.eval.pck import PCK``); importing this package is cheap.
"""
