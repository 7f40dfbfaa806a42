"""Figures: PCA colourings of feature maps, correspondence and similarity figures, PCK curves.

Every function renders with matplotlib's Agg backend (or PIL) at a fixed size and dpi, writes one
PNG and returns its path, so figures are reproducible byte for byte on one machine and never need a
display. Submodules: :mod:`~cleandift.viz.pca`, :mod:`~cleandift.viz.correspondence`,
:mod:`~cleandift.viz.plots`.
"""
