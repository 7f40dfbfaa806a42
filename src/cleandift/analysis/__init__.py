"""Analyses of diffusion features: timestep sweeps of downstream scores and the noise-variance decomposition (paper §3.1)."""
