"""Training: the paper's recipes and one resumable training run."""
