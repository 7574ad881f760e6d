"""Inference on a trained run: evaluate, predict, export, CPU runtimes, benchmark, profile,
attention maps."""
