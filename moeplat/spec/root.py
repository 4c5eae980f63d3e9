"""The whole spec: one file is one experiment."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from moeplat.spec.base import Strict, check
from moeplat.spec.model import ModelSpec
from moeplat.spec.routers import UNLEARNED
from moeplat.spec.sections import (
    TOKENIZER_VOCAB,
    DataSpec,
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
        return check(problems) or self
