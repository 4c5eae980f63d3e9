"""Text generation with a KV cache for finished runs: `moeplat generate`, lm-eval's generate_until.

The implementation is pure torch and lives in moeplat.nn.generate (training samples use it too;
train may not import evaluate); this is its name for readers of runs.
"""

from moeplat.nn.generate import (
    Generation,
    GenerationError,
    filter_logits,
    generate,
    length_problem,
    next_token,
)

__all__ = ["Generation", "GenerationError", "filter_logits", "generate", "length_problem", "next_token"]
