"""Reading a finished run: load its model and tokenizer (load), generate text with a KV cache,
evaluate on downstream tasks through lm-evaluation-harness, and show its routing on text."""
