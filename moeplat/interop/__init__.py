"""Conversion to and from other libraries' modules: transformers' MoE blocks (moeplat.interop.hf)
and whole causal LMs (moeplat.interop.hf_model: export, import, the families).

transformers is an optional dependency (`pip install -e '.[hf]'`); this is the only package that
imports it, and only when a conversion back to transformers is asked for.
"""

from moeplat.interop.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
