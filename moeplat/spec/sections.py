"""The `train`, `tracking` and `parallel` sections (`data` has its own module, data_section)."""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PositiveInt, PrivateAttr, ValidationInfo, model_validator

from moeplat.spec.base import Seed, Strict, check
from moeplat.spec.samples import SamplesSpec
from moeplat.spec.slurm_section import SlurmSection

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


class ScratchInit(Strict):
    """Train from the model's own initialisation (a function of train.seed)."""

    kind: Literal["scratch"]


class UpcycleInit(Strict):
    """Sparse upcycling (Komatsuzaki et al. 2023, sec. 3.1): start an MoE model from a dense checkpoint
    of the same family. Embedding, attention, norms, head and the dense FFNs are copied; each MoE
    layer's experts are copies of that layer's dense FFN (with `granularity: m`, expert e holds
    slice e mod m of it); routers and shared experts keep their fresh initialisation.

    `checkpoint`: a `.ckpt` written by `moeplat run`, a moeplat run directory (its
    checkpoints/last.ckpt), a directory of runs such as runs/quickstart-dense (the newest), or a
    torch state_dict file of TransformerLM; relative paths are resolved against the working
    directory. It is read when a fresh run starts (not on --resume), not when the spec is validated.
    `noise`: each expert's copy is multiplied elementwise by (1 + noise * N(0, 1)), drawn
    independently per expert from `seed` (0 = exact copies).
    """

    kind: Literal["upcycle"]
    checkpoint: Annotated[str, Field(min_length=1)]
    noise: Annotated[float, Field(ge=0)] = 0.0
    seed: Seed = 0


class HfInit(Strict):
    """Start from a transformers checkpoint directory (config.json + model.safetensors) of a family
    moeplat converts exactly (Llama, Qwen2, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3; see
    docs/interop.md): continued pretraining or fine-tuning. The spec's model section must be the one
    the checkpoint describes (`moeplat import DIR -o spec.yaml` writes it); a difference is an error
    naming each key. `upcycle: true` reads a dense Llama/Qwen2 checkpoint into this spec's MoE model
    instead (sparse upcycling, as `kind: upcycle`: every expert a copy of the layer's dense FFN, or
    slice e mod granularity of it, times (1 + noise * N(0, 1)) from `seed`; routers keep their fresh
    initialisation). `path` is relative to the spec file; it is read when a fresh run starts."""

    kind: Literal["hf"]
    path: Annotated[str, Field(min_length=1)]
    upcycle: bool = False
    noise: Annotated[float, Field(ge=0)] = 0.0
    seed: Seed = 0
    _dir: str | None = PrivateAttr(None)  # the directory found at validation (absolute)

    @property
    def dir(self) -> str | None:
        return self._dir


Init = Annotated[ScratchInit | UpcycleInit | HfInit, Field(discriminator="kind")]

# Parameter groups that `freeze` and the router options act on (moeplat.compile.optim.partition).
PARAM_GROUPS = ("router", "experts", "non_moe")


class Alternate(Strict):
    """Alternating updates (block-coordinate descent over router and rest): `every` optimizer steps
    update only the routers, the next `every` steps everything else (experts and non-MoE
    parameters), and so on; `start` picks the first phase. A parameter outside the phase gets no
    gradient, so AdamW neither moves nor decays it."""

    every: PositiveInt
    start: Literal["router", "rest"] = "router"


class EvalTasks(Strict):
    """Downstream tasks of lm-evaluation-harness run on the final model at the end of `moeplat run`
    (as `moeplat eval RUN --tasks`); their metrics are logged into the run as eval/<task>/<metric>
    at its last step. `include_path`: a directory of custom task YAML files, relative to the spec
    file that sets it. `limit`: documents per task (for a quick look; not comparable to full scores)."""

    tasks: Annotated[list[str], Field(min_length=1)]
    include_path: Annotated[str, Field(min_length=1)] | None = None
    num_fewshot: Annotated[int, Field(ge=0)] | None = None
    limit: PositiveInt | None = None
    _include_dir: str | None = PrivateAttr(None)  # include_path found at validation (absolute)

    @property
    def include_dir(self) -> str | None:
        return self._include_dir or self.include_path

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> EvalTasks:
        problems = [
            (f"tasks.{i}", f"{t!r} is not a task name (no spaces or commas; e.g. hellaswag)")
            for i, t in enumerate(self.tasks)
            if not t.strip() or t != t.strip() or "," in t
        ]
        if len(set(self.tasks)) < len(self.tasks):
            problems.append(("tasks", "names a task twice"))
        base = (info.context or {}).get("eval_base_dir")
        if self.include_path is not None and base is not None:  # None: a stored spec, not a file
            problems += self._find_include(base, (info.context or {}).get("roots"))
        return check(problems) or self

    def _find_include(self, base: str, roots) -> list[tuple[str, str]]:
        local = Path(base, os.path.expanduser(self.include_path))
        if roots is not None and not any(
            Path(os.path.realpath(local)).is_relative_to(os.path.realpath(r)) for r in roots
        ):
            return [("include_path", "must stay inside the spec roots")]
        if not local.is_dir():
            return [
                (
                    "include_path",
                    f"{local} is not a directory of task YAML files (a relative path starts at the spec file)",
                )
            ]
        self._include_dir = str(local.resolve())
        return []


class Checkpointing(Strict):
    """Which checkpoint files a run leaves behind. Whatever `keep` says, checkpoints/last.ckpt is
    written during the run (every train.checkpoint_every steps, or at every validation), so a run
    that crashes or is killed resumes with --resume; `keep` decides what stays once it has ended
    successfully."""

    keep: Literal["last", "best", "all", "none"] | None = Field(
        None,
        description="last: only last.ckpt (resumable); best: only the best by val/loss; all: last.ckpt "
        "and every checkpoint written (each checkpoint_every step, or each validation); none: nothing "
        "(last.ckpt is deleted at the successful end). null: last.ckpt and the best by val/loss, or "
        "with checkpoint_every every step file. Sweep trials default to none.",
    )


class TrainSpec(Strict):
    seed: Seed = 0
    max_steps: PositiveInt
    batch_size: PositiveInt = Field(description="Sequences per micro-batch per device.")
    grad_accum: PositiveInt = 1
    optimizer: Optimizer
    schedule: Schedule = Constant(kind="constant")
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    val_every: PositiveInt = Field(100, description="Validate every this many optimizer steps.")
    log_every: PositiveInt = 10
    moe_log_every: PositiveInt | None = Field(
        None, description="Optimizer steps between MoE telemetry logs (moe/*); null = log_every."
    )
    checkpoint_every: PositiveInt | None = Field(
        None, description="Optimizer steps; null = at every validation."
    )
    checkpoint: Checkpointing = Checkpointing()
    init: Init = ScratchInit(kind="scratch")
    freeze: list[Literal["router", "experts", "non_moe"]] = Field(
        default_factory=list,
        description="Parameter groups not trained (requires_grad off, not in the optimizer).",
    )
    router_frozen_steps: Annotated[int, Field(ge=0)] = Field(
        0, description="Router warm-up: the routers get no update in the first N optimizer steps."
    )
    router_lr_multiplier: Annotated[float, Field(gt=0)] = Field(
        1.0, description="The routers' learning rate is the schedule's lr times this."
    )
    alternate: Alternate | None = None
    compile: bool = Field(
        False,
        description="Compile the model with torch.compile (default inductor backend) before training; "
        "same results as eager up to float rounding.",
    )
    eval: EvalTasks | None = Field(
        None,
        description="lm-evaluation-harness tasks run on the final model; metrics logged as eval/<task>/<metric>.",
    )
    samples: SamplesSpec | None = Field(
        None,
        description="Prompts the model continues at every checkpoint and at the end; logged as the "
        "MLflow table samples/step_<N>.json (prompt, completion, step, settings).",
    )

    @model_validator(mode="after")
    def _cross(self) -> TrainSpec:
        problems = []
        warmup = self.schedule.warmup_steps
        if warmup >= self.max_steps and isinstance(self.schedule, WarmupCosine):
            problems.append(
                ("schedule.warmup_steps", f"warmup ({warmup}) must be < max_steps ({self.max_steps})")
            )
        return check(problems + self._technique_problems()) or self

    def _technique_problems(self) -> list[tuple[str, str]]:
        problems = []
        if len(set(self.freeze)) < len(self.freeze):
            problems.append(("freeze", "names a group twice"))
        if set(self.freeze) >= set(PARAM_GROUPS):
            problems.append(("freeze", f"freezes every group {list(PARAM_GROUPS)}: nothing would train"))
        router_options = {
            "router_frozen_steps": self.router_frozen_steps != 0,
            "router_lr_multiplier": self.router_lr_multiplier != 1.0,
            "alternate": self.alternate is not None,
        }
        if "router" in self.freeze:
            problems += [
                (name, "acts on the router, but freeze names 'router': remove one of them")
                for name, used in router_options.items()
                if used
            ]
        if self.router_frozen_steps >= self.max_steps:
            problems.append(
                (
                    "router_frozen_steps",
                    f"({self.router_frozen_steps}) must be < max_steps ({self.max_steps}); "
                    "to never train the router use freeze: [router]",
                )
            )
        if self.alternate is not None and {"experts", "non_moe"} <= set(self.freeze):
            problems.append(
                ("alternate", "its second phase trains experts and non-MoE parameters, all frozen")
            )
        return problems


def train_model_problems(train: TrainSpec, moe_present: bool, router_learned: bool) -> list[tuple[str, str]]:
    """Problems of the `train` MoE options against the model (paths relative to the spec root).

    `moe_present`: the model has MoE layers; `router_learned`: their router has parameters
    (every kind but hash and random).
    """
    problems = []
    if not moe_present:
        if isinstance(train.init, UpcycleInit):
            problems.append(("train.init", "upcycling builds an MoE model, but model.moe is null"))
        if train.freeze:
            problems.append(
                ("train.freeze", "the model is dense (model.moe is null): no router or experts to freeze")
            )
    router_fields = {
        "train.router_frozen_steps": train.router_frozen_steps != 0,
        "train.router_lr_multiplier": train.router_lr_multiplier != 1.0,
        "train.alternate": train.alternate is not None,
    }
    if not (moe_present and router_learned):
        what = "the model has no MoE layer" if not moe_present else "this router kind has no parameters"
        problems += [
            (name, f"acts on the router, but {what}") for name, used in router_fields.items() if used
        ]
        if moe_present and "router" in train.freeze:
            problems.append(("train.freeze", f"names 'router', but {what}"))
    return problems


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
    system_metrics: bool = Field(
        True, description="MLflow system metrics (system/*: CPU, memory, disk, network; GPU with pynvml)."
    )
    system_metrics_every_s: Annotated[float, Field(gt=0)] = Field(
        10.0, description="Seconds between system-metrics samples."
    )
    peak_tflops: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="Peak dense TFLOP/s of one device, for perf/mfu; null = looked up by GPU name "
        "(none on CPU or an unknown GPU: then no perf/mfu).",
    )
    log_model: bool = Field(
        True, description="Log the final weights and resolved spec under model/ (for `moeplat eval`)."
    )

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
    """One process on one device (CPU or one GPU)."""

    kind: Literal["single"]


class DDP(Strict):
    """Distributed data parallel (Li et al. 2020, PyTorch DDP): every rank holds the whole model and
    a 1/world slice of each global batch; gradients are averaged by all-reduce."""

    kind: Literal["ddp"]


class FSDP(Strict):
    """Fully sharded data parallel (Zhao et al. 2023, PyTorch FSDP; ZeRO, Rajbhandari et al. 2020).
    `sharding`: full = parameters, gradients and optimizer state sharded (ZeRO-3); grad_op =
    gradients and optimizer state (ZeRO-2); hybrid = full within a node, replicated across nodes;
    no_shard = DDP semantics through FSDP."""

    kind: Literal["fsdp"]
    sharding: Literal["full", "grad_op", "hybrid", "no_shard"] = "full"


class ExpertParallel(Strict):
    """Expert parallelism (GShard, Lepikhin et al. 2021, sec. 3.2; Switch, Fedus et al. 2022, sec. 2.2):
    the routed experts of each MoE layer are sharded over an expert-parallel group of `ep_size`
    ranks, tokens travel to their experts by `dispatcher`; the dense part (attention, embeddings,
    shared experts, routers) is data parallel over all ranks with `dense` (DDP or FSDP).
    `capacity_scope`: a capacity-factor limit counts tokens per rank (each rank's own batch) or
    globally (the whole expert-parallel group's batch)."""

    kind: Literal["expert_parallel"]
    ep_size: Annotated[int, Field(ge=1)]
    dense: Literal["ddp", "fsdp"] = "ddp"
    dispatcher: Literal["all_to_all", "all_gather"] = "all_to_all"
    capacity_scope: Literal["rank", "global"] = "rank"


Strategy = Annotated[SingleDevice | DDP | FSDP | ExpertParallel, Field(discriminator="kind")]


class ParallelSpec(Strict):
    """How the run is laid out on hardware: devices per node x num_nodes processes (one per device).
    Precision and gradient accumulation stay in `train` (train.precision, train.grad_accum): they
    change the arithmetic, not the layout. Checks that need the model (experts by ep_size) are in
    moeplat.spec.root.parallel_model_problems."""

    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Annotated[int, Field(ge=1, description="Devices (processes) per node.")] = 1
    num_nodes: Annotated[int, Field(ge=1)] = 1
    strategy: Strategy = SingleDevice(kind="single")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward instead of storing them."
    )
    slurm: SlurmSection = SlurmSection()  # where a SLURM job of this spec runs (moeplat slurm)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @model_validator(mode="after")
    def _cross(self) -> ParallelSpec:
        problems = []
        if self.strategy.kind == "single" and self.world_size > 1:
            problems.append(
                (
                    "strategy",
                    f"strategy 'single' runs on one device, but devices x num_nodes = {self.world_size}: "
                    "set strategy.kind to ddp, fsdp or expert_parallel, or devices: 1 and num_nodes: 1",
                )
            )
        s = self.strategy
        if isinstance(s, ExpertParallel) and self.world_size % s.ep_size:
            problems.append(
                (
                    "strategy.ep_size",
                    f"ep_size ({s.ep_size}) must divide the world size devices x num_nodes = "
                    f"{self.devices} x {self.num_nodes} = {self.world_size}",
                )
            )
        return check(problems) or self
