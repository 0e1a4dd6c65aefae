"""Toy world: a procedural image world with known ground truth, a judge that scores
images of it, and a tiny Stable-Diffusion-style base model (`builtin:toy`) trained on it."""
