"""A trained model and its tokenizer, from whatever names it: an MLflow run id, a run directory,
a Lightning checkpoint (.ckpt) of a run, or a model/ directory (the run's MLflow model artifact).

    loaded = load_trained(ref, tracking_uri)   # LoadedModel(spec, model, tok, meta, ...)

The model is in eval mode, float32, on the CPU; callers move it. A run id is looked up in MLflow
(model/ and the tokenizer/ artifact are downloaded); a path is read where it lies. Every user
mistake is a ModelNotFound naming the reference and what to pass instead.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

TOKENIZER_FILE = "tokenizer.json"
SAFETENSORS = "model.safetensors"


class ModelNotFound(Exception):
    """A reference that names no trained model here (message says what to pass instead)."""


@dataclass
class LoadedModel:
    spec: object  # moeplat.spec.Spec
    model: torch.nn.Module  # moeplat.nn.TransformerLM, eval mode
    tok: object  # moeplat.data.tokenizers ByteTok | HFTok
    meta: dict = field(default_factory=dict)  # model/meta.json (step, spec name, base_dir, ...)
    run_id: str | None = None  # the MLflow run, when known
    tracking_uri: str | None = None
    source: str = ""  # what was loaded, for messages
    resolved: dict = field(default_factory=dict)  # the resolved spec mapping (what was validated)


def load_trained(ref: str, tracking_uri: str | None = None) -> LoadedModel:
    """The model `ref` names (see the module docstring)."""
    path = Path(ref).expanduser()
    if path.exists():
        return _from_path(path)
    if "/" in ref or ref.endswith((".ckpt", ".pt")):
        raise ModelNotFound(f"{ref}: no such file or directory (pass a run id, a run directory or a .ckpt)")
    return _from_run_id(ref, tracking_uri)


def _from_run_id(run_id: str, tracking_uri: str | None) -> LoadedModel:
    from moeplat.track.mlflow_run import resolve_tracking_uri
    from moeplat.track.model_store import RunNotFound, download_artifact_dir, download_model

    uri = resolve_tracking_uri(tracking_uri, None)
    with tempfile.TemporaryDirectory(prefix="moeplat-load-") as tmp:
        try:
            model_dir, run = download_model(uri, run_id, tmp)
        except RunNotFound as e:
            raise ModelNotFound(str(e)) from None
        tok_dir = download_artifact_dir(uri, run_id, "tokenizer", tmp)
        loaded = _from_model_dir(model_dir, tok_dir)
    loaded.run_id, loaded.tracking_uri, loaded.source = run_id, uri, f"run {run_id} ({run.info.run_name})"
    return loaded


def _from_path(path: Path) -> LoadedModel:
    if path.is_file() and path.suffix == ".safetensors":
        return _from_safetensors(path)
    if path.is_dir() and (path / SAFETENSORS).is_file() and not (path / "config.json").is_file():
        return _from_safetensors(path / SAFETENSORS)
    if path.is_dir() and (path / "weights.pt").is_file():
        return _from_model_dir(path, path.parent)
    if path.is_dir() and (path / "model" / "weights.pt").is_file():
        return _from_model_dir(path / "model", path)
    if path.is_dir():
        from moeplat.compile.checkpoints import no_checkpoint_message, run_checkpoint

        ckpt = run_checkpoint(path)
        if ckpt is None:
            kept_none = no_checkpoint_message(path, "its checkpoint or model/ (tracking.log_model)")
            raise ModelNotFound(
                kept_none
                or f"{path} is neither a run directory (checkpoints/last.ckpt, model/) nor a model/ directory"
            )
        path = ckpt
    return _from_checkpoint(path)


def _from_model_dir(model_dir: Path, tok_dir: Path | None) -> LoadedModel:
    from moeplat.train.model_artifact import load_model_artifact

    spec, model, meta = load_model_artifact(model_dir)
    tok = _tokenizer(spec, tok_dir, meta.get("base_dir", "."))
    state = _run_state(model_dir.parent)
    return LoadedModel(
        spec,
        model.eval(),
        tok,
        meta,
        run_id=state.get("run_id"),
        tracking_uri=state.get("tracking_uri"),
        source=str(model_dir),
        resolved=yaml.safe_load((model_dir / "spec.yaml").read_text()),
    )


def _from_checkpoint(ckpt: Path) -> LoadedModel:
    """A .ckpt inside a run directory (runs/NAME/TIME/checkpoints/X.ckpt): the spec is the run's
    spec files with its overrides (run.json), the weights the checkpoint's."""
    from moeplat.compile.model import build_model
    from moeplat.compile.upcycle import load_checkpoint
    from moeplat.errors import SpecError
    from moeplat.spec import load_spec

    run_dir = ckpt.parent.parent
    state = _run_state(run_dir)
    if not state.get("spec_files"):
        raise ModelNotFound(f"{ckpt} is not inside a moeplat run directory (no run.json beside checkpoints/)")
    try:
        loaded_spec = load_spec(state["spec_files"][0], state.get("overrides") or [])
        weights, whole = load_checkpoint(str(ckpt))
    except (SpecError, FileNotFoundError) as e:
        raise ModelNotFound(f"{ckpt}: {e}") from None
    model = build_model(loaded_spec.spec)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ModelNotFound(f"{ckpt} does not fit the spec {state['spec_files'][0]}: {e}") from None
    step = whole.get("global_step")
    tok = _tokenizer(loaded_spec.spec, run_dir, loaded_spec.base_dir)
    meta = {
        "step": step,
        "spec_name": loaded_spec.spec.name,
        "base_dir": str(Path(loaded_spec.base_dir).resolve()),
    }
    return LoadedModel(
        loaded_spec.spec,
        model.eval(),
        tok,
        meta,
        run_id=state.get("run_id"),
        tracking_uri=state.get("tracking_uri"),
        source=str(ckpt),
        resolved=loaded_spec.resolved,
    )


def _from_safetensors(file: Path) -> LoadedModel:
    """moeplat's single-file layout (`moeplat export --format safetensors`): the resolved spec and
    run metadata in the header, the weights as the TransformerLM's state_dict."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from moeplat.compile.model import build_model
    from moeplat.evaluate.export import META_KEY, SPEC_KEY
    from moeplat.spec import validate
    from moeplat.spec.safe_yaml import compose_checked

    with safe_open(str(file), "pt") as f:
        header = f.metadata() or {}
    if SPEC_KEY not in header:
        raise ModelNotFound(
            f"{file} has no moeplat spec in its header: it was not written by `moeplat export "
            "--format safetensors` (a transformers directory is read by `moeplat import`)"
        )
    compose_checked(header[SPEC_KEY], str(file))  # the same limits as any spec file
    resolved = yaml.safe_load(header[SPEC_KEY])
    spec = validate(resolved)
    model = build_model(spec)
    load_model(model, str(file))
    meta = json.loads(header.get(META_KEY, "{}"))
    tok = _tokenizer(spec, file.parent, meta.get("base_dir", "."))
    return LoadedModel(
        spec,
        model.eval(),
        tok,
        meta,
        run_id=meta.get("run_id"),
        tracking_uri=meta.get("tracking_uri"),
        source=str(file),
        resolved=resolved,
    )


def _run_state(run_dir: Path) -> dict:
    f = run_dir / "run.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _tokenizer(spec, tok_dir: Path | None, base_dir: str):
    """The run's tokenizer: bytes; its BPE's tokenizer.json (saved with the run); an hf file."""
    from moeplat.data.tokenizers import ByteTok, load_tokenizer_file

    tok_spec = spec.data.tokenizer
    if tok_spec.kind == "byte":
        return ByteTok()
    file = tok_dir / TOKENIZER_FILE if tok_dir is not None else None
    eos = tok_spec.eos_token if tok_spec.kind == "hf" else tok_spec.special_tokens[0]
    if file is not None and file.is_file():  # the copy saved with the run or the export
        return load_tokenizer_file(file, eos_token=eos)
    if tok_spec.kind == "hf":
        from moeplat.compile.tokenizer import build_tokenizer

        return build_tokenizer(tok_spec, [], base_dir)
    raise ModelNotFound(
        f"the run's BPE tokenizer ({TOKENIZER_FILE}) is not here: expected it at {file} "
        "(a run writes it into its run directory and the MLflow artifact tokenizer/)"
    )
