"""Training: one run of one variant (trainer, loaders, losses, metrics, checkpoints, run
folders, precision, torchrun)."""
