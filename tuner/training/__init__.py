"""Training: setup (run), the step loop, optimizers, checkpoints, DreamBooth class images and the
final outputs."""
