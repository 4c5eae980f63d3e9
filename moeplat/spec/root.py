"""The whole spec: one file is one experiment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationInfo, model_validator

from moeplat.spec.base import Strict, check
from moeplat.spec.data_section import DataSpec, HfTokenizer
from moeplat.spec.model import ModelSpec
from moeplat.spec.moe import Dropless
from moeplat.spec.routers import UNLEARNED
from moeplat.spec.sections import (
    ExpertParallel,
    HfInit,
    ParallelSpec,
    TrackingSpec,
    TrainSpec,
    train_model_problems,
)
from moeplat.spec.tokenizer_files import confined, resolve_tokenizer_file, tokenizer_file_vocab_size


class Spec(Strict):
    name: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Identifies the experiment.")
    ]
    description: str = ""
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    tracking: TrackingSpec = TrackingSpec()
    parallel: ParallelSpec = ParallelSpec()

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> Spec:
        problems = []
        if self.data.seq_len > self.model.max_seq_len:
            problems.append(
                (
                    "data.seq_len",
                    f"seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})",
                )
            )
        context = info.context or {}
        problems += vocab_problems(self, context.get("tokenizer_base_dir", "."), context.get("roots"))
        problems += hf_init_problems(self, context.get("init_base_dir", "."), context.get("roots"))
        moe = self.model.moe
        learned = moe is not None and moe.router.kind not in UNLEARNED
        problems += train_model_problems(self.train, moe is not None, learned)  # train's MoE options
        problems += parallel_model_problems(self)
        return check(problems) or self


def parallel_model_problems(spec: Spec) -> list[tuple[str, str]]:
    """Problems of the `parallel` layout against the model (paths relative to the spec root):
    expert parallelism shards every MoE layer's routed experts (num_experts x granularity, per
    layer for pyramid lists) evenly over ep_size ranks."""
    ep, moe = spec.parallel.strategy, spec.model.moe
    if not isinstance(ep, ExpertParallel):
        return []
    if moe is None:
        return [("parallel.strategy", "expert_parallel shards MoE experts, but model.moe is null")]
    problems = []
    for j in range(len(spec.model.moe_layers)):
        shape = moe.shape(j)
        if shape.routed_experts % ep.ep_size:
            field = "model.moe.num_experts" if moe.granularity == 1 else "model.moe.granularity"
            problems.append(
                (
                    "parallel.strategy.ep_size",
                    f"MoE layer {j} has {shape.routed_experts} routed experts, not divisible by ep_size "
                    f"({ep.ep_size}): change parallel.strategy.ep_size or {field}",
                )
            )
            break
    if ep.capacity_scope == "global" and isinstance(moe.capacity, Dropless):
        problems.append(
            (
                "parallel.strategy.capacity_scope",
                "'global' counts a capacity limit over the group, but model.moe.capacity is dropless",
            )
        )
    return problems


def hf_init_problems(spec: Spec, base_dir: str, roots=None) -> list[tuple[str, str]]:
    """Find `train.init: {kind: hf}`'s directory (relative to the file that set it) and record it;
    its weights are read when the run starts (moeplat.compile.init)."""
    init = spec.train.init
    if not isinstance(init, HfInit):
        return []
    local = Path(base_dir, os.path.expanduser(init.path))
    if roots is not None and not any(
        Path(os.path.realpath(local)).is_relative_to(os.path.realpath(r)) for r in roots
    ):
        return [("train.init.path", "must stay inside the spec roots")]
    if not (local / "config.json").is_file():
        return [
            (
                "train.init.path",
                f"{local} is not a transformers checkpoint directory (no config.json): give the directory "
                "that save_pretrained wrote (config.json + model.safetensors)",
            )
        ]
    object.__setattr__(init, "_dir", str(local.resolve()))
    if init.upcycle and spec.model.moe is None:
        return [("train.init.upcycle", "upcycling builds an MoE model, but model.moe is null")]
    return []


def tokenizer_vocab(spec: Spec) -> int:
    """Ids the spec's tokenizer can produce: 256 bytes, the bpe's vocab_size (an upper bound: a small
    corpus may give fewer), or the hf tokenizer.json's size (its file was found at validation)."""
    tok = spec.data.tokenizer
    if tok.kind == "byte":
        return 256
    if tok.kind == "bpe":
        return tok.vocab_size
    return tokenizer_file_vocab_size(tok.file)


def vocab_problems(spec: Spec, base_dir: str, roots=None) -> list[tuple[str, str]]:
    """Find an hf tokenizer's file, resolve `model.vocab_size: auto` (padded up to vocab_multiple)
    and check an explicit vocab_size against the tokenizer's. Resolving writes the number into the
    (frozen) model section once, here, so that everything downstream reads a plain int. `roots`
    (the job server's spec roots): a local tokenizer path outside them is refused before it is read."""
    tok, m = spec.data.tokenizer, spec.model
    if isinstance(tok, HfTokenizer):
        if roots is not None and not confined(tok.path, base_dir, roots):
            return [
                ("data.tokenizer.path", "must stay inside the spec roots (or be a Hub name in the cache)")
            ]
        try:
            tok._file = str(resolve_tokenizer_file(tok.path, base_dir))
            need = tokenizer_vocab(spec)
        except (FileNotFoundError, ValueError) as e:
            return [("data.tokenizer.path", str(e))]
    else:
        need = tokenizer_vocab(spec)
    if m.vocab_size == "auto":
        object.__setattr__(m, "vocab_size", -(-need // m.vocab_multiple) * m.vocab_multiple)
        return []
    if "vocab_multiple" in m.model_fields_set:
        return [("model.vocab_multiple", "pads vocab_size: auto only; remove it or set vocab_size: auto")]
    if m.vocab_size < need:
        return [
            (
                "model.vocab_size",
                f"vocab_size {m.vocab_size} is smaller than the {tok.kind} tokenizer's vocabulary of "
                f"{need}: the {tok.kind} tokenizer needs {need} ids; set model.vocab_size: auto (or >= {need})",
            )
        ]
    return []
