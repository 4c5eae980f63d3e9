"""Spec language: YAML -> OmegaConf -> Pydantic. Never imports torch (validation answers fast)."""

from moeplat.spec.loader import LoadedSpec, load_spec, validate
from moeplat.spec.root import Spec

__all__ = ["LoadedSpec", "Spec", "load_spec", "validate"]
