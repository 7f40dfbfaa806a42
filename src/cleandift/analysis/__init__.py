"""Analyses of diffusion features: timestep sweeps of downstream scores, noise-variance decomposition (paper §3.1)."""
