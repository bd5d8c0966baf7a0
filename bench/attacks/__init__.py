"""Perturbations: the registry of what a cell measures (clean, noise, gradient attacks,
AutoAttack), the torchattacks wrapper and its audit."""
