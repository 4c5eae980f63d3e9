"""`moeplat export` (a run's model to a transformers directory or moeplat's safetensors file) and
`moeplat import` (the spec that continues training a transformers checkpoint directory)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# An imported spec's starting point; the model section is the checkpoint's (moeplat.interop).
IMPORT_MAX_SEQ_LEN = 4096  # RoPE tables per layer grow with it; raise it in the spec if needed
IMPORT_SEQ_LEN = 512


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_export(args) -> int:
    from moeplat.evaluate.export import ExportError, export_hf, export_safetensors
    from moeplat.evaluate.load import ModelNotFound, load_trained

    out = Path(args.output)
    if out.exists() and not args.force:  # before minutes of loading
        return _fail(f"{out} exists: choose another -o, or pass --force to replace it")
    try:
        loaded = load_trained(args.ref, args.tracking_uri)
        if args.format == "hf":
            info = export_hf(
                loaded,
                out,
                family=args.family,
                force=args.force,
                max_shard_size=args.max_shard_size,
                verify=not args.no_verify,
            )
        else:
            info = export_safetensors(loaded, out, force=args.force)
    except (ModelNotFound, ExportError) as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps({**info, "output": str(out)}, indent=2))
        return 0
    what = f"transformers {info['family']}" if args.format == "hf" else "moeplat safetensors"
    print(f"exported {loaded.source} (step {info['step']}) as {what} to {out}")
    if "max_abs_logit_diff" in info:
        print(f"verified: transformers' logits equal moeplat's (max |diff| {info['max_abs_logit_diff']:.2e})")
    return 0


def cmd_import(args) -> int:
    import yaml

    from moeplat.errors import SpecError
    from moeplat.interop.hf_model import FAMILIES
    from moeplat.spec import load_spec

    src, out = Path(args.directory), Path(args.output)
    if not (src / "config.json").is_file():
        return _fail(f"{src} has no config.json: give a transformers model directory (save_pretrained's)")
    if out.exists() and not args.force:
        return _fail(f"{out} exists: choose another -o, or pass --force to replace it")
    config = json.loads((src / "config.json").read_text())
    family = FAMILIES.get(config.get("model_type"))
    if family is None:
        return _fail(f"{src}: model_type {config.get('model_type')!r} is not one of {sorted(FAMILIES)}")
    try:
        spec = import_spec(src, out, family, config, args)
    except ValueError as e:
        return _fail(str(e))
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    header = (
        f"# Written by `moeplat import {src}`: the model section is the checkpoint's ({family.name});\n"
        "# data and train are a starting point for continued pretraining: edit them.\n"
    )
    tmp.write_text(header + yaml.safe_dump(spec, sort_keys=False))
    try:
        load_spec(tmp, as_path=out)
    except SpecError as e:
        tmp.unlink()
        return _fail(f"the written spec does not validate (a moeplat bug, please report it):\n{e}")
    os.replace(tmp, out)
    print(f"wrote {out}: {family.name} model, train.init from {src}; run it with `moeplat run {out}`")
    return 0


def import_spec(src: Path, out: Path, family, config: dict, args) -> dict:
    """The spec dict that starts a run from the checkpoint in `src` (paths relative to `out`)."""
    model = family.model_section(config)
    model["max_seq_len"] = min(model["max_seq_len"], IMPORT_MAX_SEQ_LEN)
    rel = os.path.relpath(src.resolve(), out.resolve().parent)
    init = {"kind": "hf", "path": rel}
    if args.upcycle:
        model, init = _upcycled(model, init, args)
    exported = src / "moeplat_export.json"
    byte = exported.is_file() and json.loads(exported.read_text()).get("tokenizer") == "byte"
    if not byte and not (src / "tokenizer.json").is_file():
        raise ValueError(f"{src} has no tokenizer.json: the imported spec needs the checkpoint's tokenizer")
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", src.resolve().name).strip("-.") or "imported"
    return {
        "name": name,
        "model": model,
        "data": {
            "source": {"kind": "python_stdlib"},
            "tokenizer": {"kind": "byte"} if byte else {"kind": "hf", "path": rel},
            "seq_len": min(IMPORT_SEQ_LEN, model["max_seq_len"]),
        },
        "train": {
            "max_steps": 200,
            "batch_size": 8,
            "optimizer": {"kind": "adamw", "lr": 1.0e-4, "weight_decay": 0.1},
            "schedule": {"kind": "warmup_cosine", "warmup_steps": 20},
            "init": init,
        },
        "tracking": {"experiment": name},
    }


def _upcycled(model: dict, init: dict, args) -> tuple[dict, dict]:
    """A dense checkpoint's model section turned into an MoE one whose experts copy its FFNs."""
    if model.get("moe") is not None:
        raise ValueError("--upcycle needs a dense checkpoint (Llama, Qwen2); this one is already MoE")
    if not args.num_experts or not args.top_k:
        raise ValueError("--upcycle needs --num-experts and --top-k")
    ffn = model.pop("dense_ffn")
    model["moe"] = {
        "num_experts": args.num_experts,
        "top_k": args.top_k,
        "layers": {"kind": "all"},
        "router": {"kind": "topk", "normalize": True},
        "experts": ffn,
        "capacity": {"kind": "dropless"},
        "losses": {"load_balancing": {"coef": 0.01}},
    }
    return model, {**init, "upcycle": True}


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a run's model as a transformers directory or a safetensors file")
    p.add_argument(
        "ref", metavar="RUN|CHECKPOINT", help="MLflow run id, run directory, .ckpt or model/ directory"
    )
    p.add_argument("-o", "--output", required=True, help="directory to write (must not exist, or --force)")
    p.add_argument("--format", choices=("hf", "safetensors"), default="hf", help="default: hf (transformers)")
    p.add_argument("--family", help="transformers family (model_type); default: the one that fits the spec")
    p.add_argument("--max-shard-size", default="2GB", help="hf: shard model.safetensors above this size")
    p.add_argument("--no-verify", action="store_true", help="hf: skip reading it back with transformers")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (for a run id)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("import", help="write the spec that starts training from a transformers checkpoint")
    p.add_argument("directory", metavar="DIR", help="transformers model directory (config.json, safetensors)")
    p.add_argument("-o", "--output", required=True, help="spec file to write")
    p.add_argument("--upcycle", action="store_true", help="dense checkpoint -> MoE model (sparse upcycling)")
    p.add_argument("--num-experts", type=int, help="--upcycle: experts per MoE layer")
    p.add_argument("--top-k", type=int, help="--upcycle: experts per token")
    p.add_argument("--force", action="store_true", help="replace an existing spec file")
    p.set_defaults(fn=cmd_import)
