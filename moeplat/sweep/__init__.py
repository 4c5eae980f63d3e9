"""Sweeps: the only package that imports optuna."""
