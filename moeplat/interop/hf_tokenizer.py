"""A run's tokenizer as transformers tokenizer files (tokenizer.json + tokenizer_config.json), so
`AutoTokenizer.from_pretrained(DIR)` reads an exported model's directory."""

from __future__ import annotations

from pathlib import Path


def save_hf_tokenizer(tokenizer, out_dir: str | Path, *, eos_id: int, model_max_length: int) -> None:
    """Write `tokenizer` (a `tokenizers.Tokenizer`) into `out_dir` for transformers. Its EOS is
    declared when the id is a special (added) token; a byte tokenizer's EOS is an ordinary byte
    (NUL), which stays out of the tokenizer config and lives in generation_config.json only."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length)
    added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    if eos_id in added:
        fast.eos_token = added[eos_id]
    fast.save_pretrained(str(out_dir))


def quiet_progress_bars() -> None:
    """transformers' per-shard progress bars say nothing for a CLI that prints its own summary."""
    from transformers.utils import logging

    logging.disable_progress_bar()
