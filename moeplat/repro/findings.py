"""The findings `moeplat repro` checks, each a comparison between named variants of the quick-start.

A variant is a spec file plus --set overrides; a finding names the variants it compares, the
figure it compares them on and the test its claim makes. Nothing here is tuned per finding: every
variant is the quick-start with only the setting the finding is about changed. The verdicts are
mechanical (mean over seeds, and whether the gap exceeds the seeds' spread); the page prints the
numbers either way.
"""

from __future__ import annotations

from dataclasses import dataclass

QUICKSTART = "specs/quickstart.yaml"
DENSE = "specs/quickstart-dense.yaml"
MIXTURE = "specs/data/mixture-code-prose.yaml"

# `--quick`: the same comparisons on a smaller model for fewer steps (minutes on 2 CPU cores, for CI).
QUICK = (
    "model.d_model=64",
    "model.n_layers=2",
    "model.max_seq_len=64",
    "train.batch_size=8",
    "train.max_steps=40",
    "train.val_every=40",
    "train.log_every=5",
    "train.schedule.warmup_steps=5",
    "data.val_tokens=4096",
)
QUICK_DENSE = ("model.dense_ffn.d_ff=512",)  # unchanged: quickstart-dense's top_k x d_ff
QUICK_SOURCES = ("data.source.max_bytes=1000000",)


@dataclass(frozen=True)
class Variant:
    name: str
    spec: str  # relative to the repository root
    overrides: tuple[str, ...] = ()
    quick_data: tuple[str, ...] = QUICK_SOURCES  # --quick: how this variant's data is made smaller


@dataclass(frozen=True)
class Finding:
    key: str
    claim: str  # what the literature says, as the page states it
    source: str  # the paper(s)
    variants: tuple[str, ...]  # the first is the baseline the others are compared with
    figure: str  # "val/loss" or a telemetry key the claim is about
    lower_is_better: bool = True  # the direction the claim predicts for the second variant
    # the claim's condition on val loss too: "equal or better" (not worse than the baseline's seed
    # spread) or "comparable" (within it either way); None when the figure is val/loss itself
    guard: str | None = None
    # variants whose learning rate was chosen by one sweep over LR_GRID on the first seed; the
    # page shows each sweep, so a reader can check that every side had the same tuning effort
    lr_sweep: tuple[str, ...] = ()


NO_LOSSES = "model.moe.losses={}"
# Global- and micro-batch balancing differ only when a step has several micro-batches: the same
# 16 sequences a step as the quick-start, in 4 micro-batches of 4 (Qiu et al. 2025 compare micro-
# batches far smaller than the global batch).
SMALL_MICRO_BATCH = ("train.batch_size=4", "train.grad_accum=4")
QUICK_MIXTURE = (
    "data.source.sources.0.source.max_bytes=600000",
    "data.val_tokens=4096",
    "train.batch_size=2",
)
VARIANTS = {
    v.name: v
    for v in (
        Variant("moe", QUICKSTART),
        Variant("dense", DENSE),
        Variant("no-balancing", QUICKSTART, (NO_LOSSES,)),
        Variant(
            "aux-free-bias",
            QUICKSTART,
            ("model.moe.router={kind: sigmoid_bias, gamma: 0.001}", NO_LOSSES),
        ),
        # the quick-start is 16 experts of width 128, top-4; these halve and double the granularity
        # at the same active width 512
        Variant(
            "coarse",
            QUICKSTART,
            ("model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.experts.d_ff=256"),
        ),
        Variant(
            "fine-grained",
            QUICKSTART,
            ("model.moe.num_experts=32", "model.moe.top_k=8", "model.moe.experts.d_ff=64"),
        ),
        Variant("top-p", "specs/quickstart-top-p.yaml"),  # p 0.4, at most 4 experts, dynamic loss
        Variant(
            "mixture-micro",
            MIXTURE,
            (*SMALL_MICRO_BATCH, "model.moe.losses.load_balancing.scope=micro_batch"),
            QUICK_MIXTURE,
        ),
        Variant(
            "mixture-global",
            MIXTURE,
            (*SMALL_MICRO_BATCH, "model.moe.losses.load_balancing.scope=global_batch"),
            QUICK_MIXTURE,
        ),
    )
}

# The learning rates the quick-start MoE and its dense counterpart were each tuned over (seed 0);
# each spec file holds its own best. A sweep point equal to the spec is the same run as the variant's.
LR_GRID = (1e-3, 1.5e-3, 3e-3, 6e-3)


def lr_variant(name: str, lr: float) -> str:
    return f"{name}@lr={lr:g}"


def _with_lr_grid(variants: dict[str, Variant], names: tuple[str, ...]) -> dict[str, Variant]:
    grid = {
        lr_variant(n, lr): Variant(
            lr_variant(n, lr), variants[n].spec, (*variants[n].overrides, f"train.optimizer.lr={lr}")
        )
        for n in names
        for lr in LR_GRID
    }
    return {**variants, **grid}


VARIANTS = _with_lr_grid(VARIANTS, ("dense", "moe"))

FINDINGS = (
    Finding(
        "moe-vs-dense",
        "An MoE model beats the dense model of equal active parameters at equal steps.",
        "Switch Transformers (Fedus et al. 2021)",
        ("dense", "moe"),
        "val/loss",
        lr_sweep=("dense", "moe"),
    ),
    Finding(
        "collapse",
        "Without any balancing the load collapses (MaxVio rises); the auxiliary loss prevents it.",
        "Shazeer et al. 2017; Switch Transformers (Fedus et al. 2021)",
        ("moe", "no-balancing"),
        "moe/all/maxvio",
        lower_is_better=False,
    ),
    Finding(
        "aux-free",
        "Aux-loss-free bias balancing reaches a lower MaxVio than the auxiliary loss at equal or better val loss.",
        "DeepSeek-V3 (DeepSeek-AI 2024); Wang et al. 2024",
        ("moe", "aux-free-bias"),
        "moe/all/maxvio",
        guard="equal or better",
    ),
    Finding(
        "global-batch",
        "Global-batch balancing gives higher domain specialisation than micro-batch balancing at equal or better val loss.",
        "Qiu et al. 2025, Demons in the Detail",
        ("mixture-micro", "mixture-global"),
        "moe/specialization",
        lower_is_better=False,
        guard="equal or better",
    ),
    Finding(
        "top-p",
        "Top-p routing uses fewer experts per token on average than top-k routing (the quick-start's "
        "top-4) at comparable val loss.",
        "Huang et al. 2024, Harder Tasks Need More Experts",
        ("moe", "top-p"),
        "moe/all/experts_per_token",
        guard="comparable",
    ),
    Finding(
        "granularity",
        "More, smaller experts at equal active parameters lower the loss: 16 of width 128 (top-4) "
        "against 8 of width 256 (top-2).",
        "DeepSeekMoE (Dai et al. 2024); Krajewski et al. 2024",
        ("coarse", "moe"),
        "val/loss",
    ),
    Finding(
        "granularity-finer",
        "The same one step further: 32 experts of width 64 (top-8) against the quick-start's 16.",
        "DeepSeekMoE (Dai et al. 2024); Krajewski et al. 2024",
        ("moe", "fine-grained"),
        "val/loss",
    ),
)
