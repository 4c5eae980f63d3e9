"""Tracking: the only package that imports mlflow."""
