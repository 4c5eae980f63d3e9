"""The whole spec: one file is one experiment."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from moeplat.spec.base import Strict, check
from moeplat.spec.model import ModelSpec
from moeplat.spec.moe import Dropless
from moeplat.spec.routers import UNLEARNED
from moeplat.spec.sections import (
    TOKENIZER_VOCAB,
    DataSpec,
    ExpertParallel,
    ParallelSpec,
    TrackingSpec,
    TrainSpec,
    train_model_problems,
)


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
    def _cross(self) -> Spec:
        problems = []
        if self.data.seq_len > self.model.max_seq_len:
            problems.append(
                (
                    "data.seq_len",
                    f"seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})",
                )
            )
        need = TOKENIZER_VOCAB[self.data.tokenizer.kind]
        if self.model.vocab_size < need:
            problems.append(
                (
                    "model.vocab_size",
                    f"vocab_size must be >= {need} for the {self.data.tokenizer.kind} tokenizer",
                )
            )
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
