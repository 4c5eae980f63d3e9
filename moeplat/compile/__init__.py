"""The one translation layer: spec objects -> torch modules, data, optimizers (ARCHITECTURE.md principle 3)."""
