"""`moeplat export`: a trained model written as a transformers model directory, or in moeplat's
own single-file layout.

- `hf`: config.json, model.safetensors (sharded above max_shard_size), generation_config.json,
  tokenizer files, moeplat_export.json (where it came from), for the transformers family that
  computes exactly the spec's model (moeplat.interop.hf_model). After writing, the directory is
  read back with transformers and its logits compared with moeplat's (unless verify=False).
- `safetensors`: model.safetensors with the resolved spec and run metadata embedded in the file's
  header, plus tokenizer.json for learned tokenizers. `load_trained` reads it back.

Everything is written to a temporary directory beside the target and renamed into place, so an
interrupted export never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

WEIGHTS = "model.safetensors"
SPEC_KEY, META_KEY = "moeplat.spec", "moeplat.meta"
VERIFY_TOLERANCE = 1e-4  # float32 logits; the parity tests hold them to 1e-5 on tiny models


class ExportError(Exception):
    """A user mistake (target exists, spec no family expresses, ...); the message says what to do."""


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """A fresh temporary directory beside `out`, renamed to `out` when the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists: choose another -o, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def provenance(loaded) -> dict:
    return {
        "source": loaded.source,
        "run_id": loaded.run_id,
        "tracking_uri": loaded.tracking_uri,
        "spec_name": loaded.spec.name,
        "step": loaded.meta.get("step"),
    }


def export_hf(
    loaded,
    out: Path,
    *,
    family: str | None = None,
    force: bool = False,
    max_shard_size: str = "2GB",
    verify: bool = True,
) -> dict:
    """Write `loaded` (a LoadedModel) as a transformers model directory; returns a summary."""
    from moeplat.interop.hf_model import Unsupported, to_hf_model
    from moeplat.interop.hf_tokenizer import quiet_progress_bars, save_hf_tokenizer

    quiet_progress_bars()
    try:
        config, hf_model = to_hf_model(loaded.model, family)
    except Unsupported as e:
        raise ExportError(f"no transformers family computes this spec's model:\n{e}") from None
    tok = loaded.tok
    hf_model.generation_config.eos_token_id = tok.eos_id
    hf_model.generation_config.max_length = loaded.spec.model.max_seq_len
    with atomic_dir(out, force) as tmp:
        hf_model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        tokenizer = tok.to_tokenizers() if tok.kind == "byte" else tok.tok
        save_hf_tokenizer(tokenizer, tmp, eos_id=tok.eos_id, model_max_length=loaded.spec.model.max_seq_len)
        info = {**provenance(loaded), "format": "hf", "family": config.model_type, "tokenizer": tok.kind}
        (tmp / "moeplat_export.json").write_text(json.dumps(info, indent=2))
        if verify:
            info["max_abs_logit_diff"] = _verify(loaded.model, tmp)
    return info


def _verify(model, directory: Path) -> float:
    """Read the directory back with transformers and compare logits on a fixed batch."""
    from moeplat.interop.hf_model import hf_logits

    g = torch.Generator().manual_seed(0)
    idx_BS = torch.randint(0, model.tok_emb.num_embeddings, (2, min(32, model.max_seq_len)), generator=g)
    with torch.no_grad():
        ours = model(idx_BS).logits_BSV.float()
    diff = (hf_logits(directory, idx_BS) - ours).abs().max().item()
    if not diff <= VERIFY_TOLERANCE:
        raise ExportError(
            f"transformers computes different logits from the written model (max |diff| {diff:.3g}): "
            "this is a moeplat bug, please report it with the spec"
        )
    return diff


def export_safetensors(loaded, out: Path, *, force: bool = False) -> dict:
    """moeplat's own layout: out/model.safetensors with the resolved spec in its header."""
    from safetensors.torch import save_model

    info = {**provenance(loaded), "format": "safetensors"}
    meta = {
        SPEC_KEY: yaml.safe_dump(loaded.resolved, sort_keys=False),
        META_KEY: json.dumps({**loaded.meta, **info}),
    }
    with atomic_dir(out, force) as tmp:
        save_model(loaded.model, str(tmp / WEIGHTS), metadata=meta)  # ties kept once
        if loaded.tok.kind != "byte":
            loaded.tok.save(tmp)
    return info
