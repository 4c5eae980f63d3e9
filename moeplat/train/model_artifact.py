"""The model artifact of a run: final weights and the resolved spec they belong to, under model/.

  model/weights.pt   torch state_dict of moeplat.nn TransformerLM (what build_model(spec) returns)
  model/spec.yaml    the resolved spec (after extends, ${...} and --set): enough to rebuild the model
  model/meta.json    step, spec name and hash, overrides, the data base directory, val/loss at the end

`moeplat eval RUN_ID` downloads it (moeplat.track.model_store), rebuilds the model with
moeplat.compile.model.build_model, loads the weights and runs the same validation as training
(LMSystem.validation_step on the spec's validation split), so its val/loss equals the run's last
logged val/loss for the same number of batches.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import yaml

from moeplat.spec import LoadedSpec, Spec, validate

PREFIX = "model."  # LMSystem keeps the TransformerLM as self.model


def save_model_artifact(
    tracked, state_dict: dict, loaded: LoadedSpec, run_dir: Path, step: int, val_loss: float | None
) -> Path:
    """Write model/ into `run_dir` and log it to `tracked` (rank 0's TrackedRun). `state_dict` is
    the LightningModule's (keys model.*), as trainer.strategy.lightning_module_state_dict() gives it."""
    out = Path(run_dir) / "model"
    out.mkdir(parents=True, exist_ok=True)
    weights = {
        k.removeprefix(PREFIX): v.detach().cpu() for k, v in state_dict.items() if k.startswith(PREFIX)
    }
    torch.save(weights, out / "weights.pt")
    resolved = copy.deepcopy(loaded.resolved)
    tokenizer = loaded.spec.data.tokenizer
    if tokenizer.kind == "hf":  # where validation found it, so eval resolves it from any directory
        resolved["data"]["tokenizer"]["path"] = tokenizer.file
    (out / "spec.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    meta = {
        "step": step,
        "spec_name": loaded.spec.name,
        "spec_hash": loaded.spec_hash,
        "overrides": loaded.overrides,
        "base_dir": str(Path(loaded.base_dir).resolve()),
        "val_loss": val_loss,
        "val_tokens": loaded.spec.data.val_tokens,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    tracked.log_artifacts(str(out), "model")
    return out


def load_model_artifact(model_dir: str | Path) -> tuple[Spec, torch.nn.Module, dict]:
    """(spec, model with the run's final weights, meta) from a downloaded model/ directory."""
    from moeplat.compile.model import build_model
    from moeplat.spec.safe_yaml import compose_checked, read_spec_bytes

    model_dir = Path(model_dir)
    text = read_spec_bytes(model_dir / "spec.yaml")  # a downloaded model is input like any spec:
    compose_checked(text, str(model_dir / "spec.yaml"))  # the same limits before it is built
    spec = validate(yaml.safe_load(text))
    meta = json.loads((model_dir / "meta.json").read_text())
    model = build_model(spec)
    model.load_state_dict(torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True))
    return spec, model, meta


def evaluate(spec: Spec, model: torch.nn.Module, base_dir: str, val_tokens: int | str | None = None) -> float:
    """Token-weighted mean validation loss of `model` over the validation text of the spec (its
    data.val_tokens per source, or `val_tokens` instead: a number or "all"), on one device at the
    spec's precision."""
    import lightning as L

    from moeplat.compile.data import build_data
    from moeplat.train.system import LMSystem

    if val_tokens is not None:
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"val_tokens": val_tokens})})
    datamodule, _ = build_data(spec, base_dir)
    system = LMSystem(model, configure=_no_optimizer)
    trainer = L.Trainer(
        accelerator=spec.parallel.accelerator,
        devices=1,
        precision=spec.train.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(system, datamodule=datamodule, verbose=False)
    return system.last_val["val/loss"]


def _no_optimizer(model):
    raise AssertionError("evaluation does not train")
