"""Tiny random-weight pipelines of every backbone family, for tests and benchmarks (no download).

Each ``tiny_<family>.py`` builds the family's real diffusers classes (denoiser, VAE, text encoders,
tokenizers, scheduler) at toy sizes, and :func:`save` writes them as a standard diffusers pipeline
folder that :func:`cleandift.load_backbone` loads through the same code users' real folders take.
"""
