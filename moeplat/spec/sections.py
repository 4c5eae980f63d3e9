"""The `data`, `train`, `tracking` and `parallel` sections."""

from __future__ import annotations

import string
from typing import Annotated, Literal

from pydantic import Field, PositiveInt, model_validator

from moeplat.spec.base import Strict, check

# --- data ------------------------------------------------------------------------------------


class PythonStdlibSource(Strict):
    """Built-in real corpus: the .py sources of the running Python's standard library (no download)."""

    kind: Literal["python_stdlib"]
    include_tests: bool = False
    max_bytes: PositiveInt | None = Field(
        None, description="Cap on corpus size; documents chosen by a stable hash."
    )


class TextFilesSource(Strict):
    """Local text files and folders (folders walked recursively, filtered by glob patterns).

    Relative paths are resolved against the directory of the spec file that names them.
    """

    kind: Literal["text_files"]
    paths: Annotated[list[str], Field(min_length=1)]
    patterns: Annotated[list[str], Field(min_length=1, default_factory=lambda: ["*.txt", "*.md"])]
    max_bytes: PositiveInt | None = None


DataSource = Annotated[PythonStdlibSource | TextFilesSource, Field(discriminator="kind")]


class ByteTokenizer(Strict):
    """UTF-8 bytes as tokens (vocab 256): no training, every text representable."""

    kind: Literal["byte"]


Tokenizer = Annotated[ByteTokenizer, Field(discriminator="kind")]

TOKENIZER_VOCAB = {"byte": 256}


class DataSpec(Strict):
    source: DataSource
    tokenizer: Tokenizer = ByteTokenizer(kind="byte")
    seq_len: PositiveInt
    val_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.05
    split_seed: int = Field(0, description="Seed of the document-level train/validation split.")
    num_workers: Annotated[int, Field(ge=0)] = 0


# --- train -----------------------------------------------------------------------------------


class AdamW(Strict):
    """AdamW (Loshchilov & Hutter 2019); weight decay applies to matrices only, not norms."""

    kind: Literal["adamw"]
    lr: Annotated[float, Field(gt=0)]
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.1


Optimizer = Annotated[AdamW, Field(discriminator="kind")]


class WarmupCosine(Strict):
    """Linear warmup to lr, then cosine decay to min_lr_ratio * lr at train.max_steps."""

    kind: Literal["warmup_cosine"]
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1


class Constant(Strict):
    """Linear warmup to lr, then constant."""

    kind: Literal["constant"]
    warmup_steps: Annotated[int, Field(ge=0)] = 0


Schedule = Annotated[WarmupCosine | Constant, Field(discriminator="kind")]


class TrainSpec(Strict):
    seed: int = 0
    max_steps: PositiveInt
    batch_size: PositiveInt = Field(description="Sequences per micro-batch per device.")
    grad_accum: PositiveInt = 1
    optimizer: Optimizer
    schedule: Schedule = Constant(kind="constant")
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    val_every: PositiveInt = Field(100, description="Validate every this many optimizer steps.")
    val_batches: PositiveInt = 20
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt | None = Field(
        None, description="Optimizer steps; null = at every validation."
    )

    @model_validator(mode="after")
    def _cross(self) -> TrainSpec:
        problems = []
        warmup = self.schedule.warmup_steps
        if warmup >= self.max_steps and isinstance(self.schedule, WarmupCosine):
            problems.append(
                ("schedule.warmup_steps", f"warmup ({warmup}) must be < max_steps ({self.max_steps})")
            )
        return check(problems) or self


# --- tracking and parallel -------------------------------------------------------------------


RUN_NAME_FIELDS = ("name", "overrides", "router", "top_k", "num_experts")


class TrackingSpec(Strict):
    """Where the run is logged. Tracking URI precedence: --tracking-uri, this `uri`,
    $MLFLOW_TRACKING_URI, then the embedded local store `sqlite:///mlflow.db` in the working directory."""

    enabled: bool = True
    experiment: Annotated[str, Field(min_length=1)] = "moeplat"
    run_name: str = Field(
        "{name}{overrides}",
        description="Template; fields: {name} {overrides} {router} {top_k} {num_experts}.",
    )
    uri: str | None = None

    @model_validator(mode="after")
    def _cross(self) -> TrackingSpec:
        problems = []
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.run_name) if f is not None}
        except ValueError as e:
            fields, problems = set(), [("run_name", f"not a valid template: {e}")]
        unknown = sorted(fields - set(RUN_NAME_FIELDS))
        if unknown:
            problems.append(("run_name", f"unknown template field(s) {unknown}; use {list(RUN_NAME_FIELDS)}"))
        return check(problems) or self


class SingleDevice(Strict):
    kind: Literal["single"]


Strategy = Annotated[SingleDevice, Field(discriminator="kind")]


class ParallelSpec(Strict):
    """How the run is laid out on hardware. v1 trains on one device (CPU or one GPU)."""

    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Annotated[int, Field(ge=1, description="Devices per node; v1 trains on one.")] = 1
    strategy: Strategy = SingleDevice(kind="single")

    @model_validator(mode="after")
    def _cross(self) -> ParallelSpec:
        problems = []
        if self.devices > 1:
            problems.append(
                ("devices", f"devices={self.devices}: v1 trains on one device (strategy 'single'); set 1")
            )
        return check(problems) or self
