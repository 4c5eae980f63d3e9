"""Where an `hf` tokenizer's `tokenizer.json` lives, and its vocabulary size, read at validate time.

`data.tokenizer.path` is, in this order: a `tokenizer.json` file; a directory holding one (a
transformers `save_pretrained` directory); or a Hub name `org/name`, looked up in the local
Hugging Face cache only (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub),
at the snapshot that `refs/main` names. Nothing is ever downloaded. Relative paths resolve against
the directory of the spec file that set the key. Plain os and json: validation stays fast and free
of heavy imports.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def resolve_tokenizer_file(path: str, base_dir: str | Path = ".") -> Path:
    """The absolute `tokenizer.json` that `path` names; FileNotFoundError saying where it looked."""
    local = Path(base_dir, os.path.expanduser(path)).resolve()
    if local.is_file():
        return local
    if local.is_dir():
        if (local / TOKENIZER_FILE).is_file():
            return local / TOKENIZER_FILE
        raise FileNotFoundError(
            f"the directory {local} holds no {TOKENIZER_FILE} (only fast tokenizers are supported: "
            "save one with transformers' PreTrainedTokenizerFast.save_pretrained)"
        )
    looked = [str(local)]
    if _HUB_NAME.match(path):
        repo = hf_hub_cache() / ("models--" + path.replace("/", "--"))
        ref = repo / "refs" / "main"
        if ref.is_file():
            snap = repo / "snapshots" / ref.read_text(encoding="utf-8").strip() / TOKENIZER_FILE
            if snap.is_file():
                return snap
            looked.append(str(snap))
        else:
            looked.append(f"{ref} (the Hugging Face cache)")
        hint = (
            f"; nothing is downloaded at run time: fetch it where there is network "
            f"(huggingface-cli download {path} {TOKENIZER_FILE}) into this cache, or give a path"
        )
    else:
        hint = ""
    raise FileNotFoundError(f"no tokenizer found: looked at {' and '.join(looked)}{hint}")


def tokenizer_file_vocab_size(file: Path) -> int:
    """Ids a tokenizer.json can produce: one more than its largest id (model vocab and added tokens)."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        ids = list(range(len(vocab))) if isinstance(vocab, list) else list(vocab.values())
        ids += [t["id"] for t in data.get("added_tokens") or []]
        return max(ids) + 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file} is not a tokenizers tokenizer.json ({type(e).__name__}: {e})") from None


def confined(path: str, base_dir: str | Path, roots) -> bool:
    """Whether `path` may be read under the job server's spec `roots`: a local path inside them
    (symlinks resolved, checked before the file is touched), or a Hub name that is no local path."""
    local = os.path.realpath(Path(base_dir, os.path.expanduser(path)))
    if any(Path(local).is_relative_to(os.path.realpath(r)) for r in roots):
        return True
    return bool(_HUB_NAME.match(path)) and not os.path.exists(local)
