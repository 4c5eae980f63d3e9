"""moeplat: a declarative platform for Mixture-of-Experts experiments."""

__version__ = "0.1.0"
