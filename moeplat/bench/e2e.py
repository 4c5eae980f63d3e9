"""The whole training step, end to end: moeplat's MoE model vs its dense counterpart vs the
transformers model that computes the same function, in one process (`moeplat bench`, e2e section).

Candidates, all float32 on the CPU (or the current device), one batch of random token ids of the
spec's train.batch_size x data.seq_len, each step = forward, (loss + aux loss).backward(), AdamW
step and zero_grad (no gradient clipping, no schedule, no data loading):

- `moeplat:moe`: the spec's model (moeplat.compile.build_model), AdamW of moeplat.compile.optim,
  without routing statistics, as most training steps run (LMSystem computes them only on the steps
  that log them: 1 in train.moe_log_every, default log_every);
- `moeplat:moe, logging step`: the same step with the routing statistics (RoutingStats of every
  MoE layer); its excess over moeplat:moe divided by moe_log_every is what telemetry costs a run;
- `moeplat:moe, no ranges`: the same model and optimizer with moeplat.nn.profiling's ranges off,
  which prices the profiler ranges the phase breakdown reads;
- `moeplat:dense`: the dense counterpart: for the quick-start specs/quickstart-dense.yaml; for
  another spec, derived here: every MoE layer replaced by one FFN of the experts' activation and
  hidden size top_k * d_ff (+ the shared experts' width), the same active FFN parameters per token;
- `hf:<family>:<impl>`: transformers' causal LM of the family that computes the same function
  (moeplat.interop.hf_model.to_hf_model: the same weights, checked by the logits at build), once per
  experts implementation transformers has; those that do not run here (deepgemm: bfloat16 only;
  sonicmoe: CUDA only) are listed as skipped, and so is batched_mm where its per-slot copies of the
  expert weights would pass 1 GiB (6 GiB at the quick-start's batch: it is meant for decoding). Its
  loss is cross-entropy plus router_aux_loss_coef * its load-balancing loss (what the Mixtral
  family computes when asked for router logits); AdamW with the same groups and settings;
- `moeplat:moe, compiled` (opt-in): torch.compile of the moeplat model, compile time excluded.

Rounds are interleaved (each round runs every candidate for `steps` steps, so a noisy neighbour
slows them alike); after `warmup` steps each, a candidate's figure is the median over rounds of
its ms per step. The phase breakdown (moeplat.bench.e2e_phases) profiles the logging step, so that
the statistics show as a phase.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeplat.compile.model import build_model
from moeplat.compile.optim import build_optimizer
from moeplat.nn import DenseFFN, MoELayer
from moeplat.nn.experts import ffn_matrices
from moeplat.nn.profiling import OPTIMIZER, phase, ranges_off
from moeplat.spec import load_spec

REFERENCE_SPEC = "specs/quickstart.yaml"
REFERENCE_DENSE = "specs/quickstart-dense.yaml"
BASELINE = "moeplat:moe"
LOGGING = f"{BASELINE}, logging step"  # with the routing statistics
BATCHED_MM_MAX_BYTES = 2**30  # transformers' batched_mm above this is skipped (see _batched_mm_bytes)


@dataclass
class Candidate:
    name: str
    step: Callable[[], None] | None  # None: skipped, `note` says why
    note: str = ""
    params: int = 0


def _adamw(train, model: nn.Module) -> torch.optim.Optimizer:
    """moeplat's AdamW groups for a model moeplat did not build: decay on matrices only."""
    opt, params = train.optimizer, [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=opt.lr, betas=opt.betas, eps=opt.eps)


def _optimizer_step(opt: torch.optim.Optimizer) -> None:
    with phase(OPTIMIZER):
        opt.step()
        opt.zero_grad(set_to_none=True)


def moeplat_step(
    model: nn.Module, opt, x_BS: torch.Tensor, y_BS: torch.Tensor, stats: bool = False
) -> Callable[[], None]:
    """One training step; `stats`: with the routing statistics, which training computes only on
    the steps that log them (LMSystem: 1 step in train.moe_log_every, default log_every)."""

    def step() -> None:
        out = model(x_BS, y_BS, stats=stats)
        (out.loss + out.aux_loss).backward()
        _optimizer_step(opt)

    return step


def hf_step(hf_model: nn.Module, opt, x_BS: torch.Tensor, y_BS: torch.Tensor) -> Callable[[], None]:
    coef = getattr(hf_model.config, "router_aux_loss_coef", 0.0) or 0.0

    def step() -> None:
        out = hf_model(input_ids=x_BS, use_cache=False, **({"output_router_logits": True} if coef else {}))
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), y_BS.flatten())
        if coef:
            loss = loss + coef * out.aux_loss
        loss.backward()
        _optimizer_step(opt)

    return step


def dense_counterpart(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of `model` with every MoE layer replaced by one FFN of its experts' activation and
    hidden size top_k * d_ff + the shared experts' width: the same active FFN parameters per token
    (quickstart-dense.yaml's rule), re-initialised by the model's own scheme."""
    dense = copy.deepcopy(model)
    for block in dense.blocks:
        layer = block.ffn
        if isinstance(layer, MoELayer):
            ex = layer.experts
            shared = layer.shared.w_up.out_features if layer.shared is not None else 0
            block.ffn = DenseFFN(ex.d_model, layer.top_k * ex.d_ff + shared, ex.activation)
    torch.manual_seed(seed)
    dense.reset_parameters()
    return dense


def _batched_mm_bytes(model: nn.Module, tokens: int) -> int:
    """float32 bytes of the per-slot weight copies transformers' batched_mm experts gather and keep
    for backward (`gate_up_proj[expert_ids]`, `down_proj[expert_ids]`: [T*K, D, 2F] and [T*K, F, D]
    per layer): 6 GiB at the quick-start's 2048 tokens, where the step crawls and swaps."""
    total = 0
    for block in model.blocks:
        if isinstance(block.ffn, MoELayer):
            ex = block.ffn.experts
            total += tokens * block.ffn.top_k * ex.d_model * ex.d_ff * ffn_matrices(ex.activation) * 4
    return total


def hf_candidates(model: nn.Module, spec, x_BS, y_BS, device) -> tuple[list[Candidate], dict]:
    """One candidate per experts implementation (skipped where it does not run here), and the
    largest |logits difference| to moeplat's per implementation (the same function, checked)."""
    try:
        from moeplat.interop.hf_configs import all_experts_implementations
        from moeplat.interop.hf_model import to_hf_model

        _, base = to_hf_model(model.eval())
    except Exception as e:  # Unsupported family, no transformers: rows skipped, not the bench
        return [Candidate("hf", None, f"skipped: {str(e).splitlines()[0][:100]}")], {}
    finally:
        model.train()
    family = base.config.model_type
    with torch.no_grad():
        ref = model.eval()(x_BS).logits_BSV.float()
    model.train()
    cands, diffs = [], {}
    gathered = _batched_mm_bytes(model, x_BS.numel())
    for impl in all_experts_implementations():
        if impl == "batched_mm" and gathered > BATCHED_MM_MAX_BYTES:
            note = f"skipped: copies expert weights per routed slot, {gathered / 2**30:.1f} GiB here (for decoding)"
            cands.append(Candidate(f"hf:{family}:{impl}", None, note))
            continue
        hf_model = copy.deepcopy(base).to(device)
        try:
            hf_model.set_experts_implementation(impl)
            with torch.no_grad():
                logits = hf_model(input_ids=x_BS, use_cache=False).logits.float()
        except Exception as e:  # kernels that need CUDA or bfloat16 (deepgemm, sonicmoe)
            cands.append(Candidate(f"hf:{family}:{impl}", None, f"skipped: {str(e).splitlines()[0][:90]}"))
            continue
        diffs[impl] = (logits - ref).abs().max().item()
        hf_model.train()
        step = hf_step(hf_model, _adamw(spec.train, hf_model), x_BS, y_BS)
        n = sum(p.numel() for p in hf_model.parameters())
        cands.append(Candidate(f"hf:{family}:{impl}", step, f"max |logits - moeplat's| {diffs[impl]:.1e}", n))
    return cands, diffs


def _batch(spec, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [B, S] and their next tokens: speed does not depend on the text."""
    g = torch.Generator().manual_seed(seed)
    B, S = spec.train.batch_size, spec.data.seq_len
    ids = torch.randint(0, spec.model.vocab_size, (B, S + 1), generator=g).to(device)
    return ids[:, :-1], ids[:, 1:]


def _dense_model(spec_file: str, dense_spec: str | None, model: nn.Module, device):
    """(dense model, its spec, how it was made): the dense spec's model if given, else derived."""
    if dense_spec:
        spec = load_spec(dense_spec).spec
        torch.manual_seed(spec.train.seed)
        return build_model(spec).to(device).train(), spec, dense_spec
    how = "derived: each MoE layer -> one FFN of hidden top_k * d_ff (+ shared)"
    return dense_counterpart(model).to(device).train(), load_spec(spec_file).spec, how


def build_candidates(
    spec_file: str, dense_spec: str | None, device, *, hf: bool = True, compiled: bool = False
) -> tuple[list[Candidate], dict]:
    """Every candidate's step on the same batch, and facts for the report (sizes, logits check)."""
    spec = load_spec(spec_file).spec
    x_BS, y_BS = _batch(spec, device)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec).to(device).train()
    opt = build_optimizer(spec.train, model)
    step = moeplat_step(model, opt, x_BS, y_BS)

    def no_ranges() -> None:
        with ranges_off():
            step()

    n_moe, every = model.num_params(), spec.train.moe_log_every or spec.train.log_every
    cands = [
        Candidate(BASELINE, step, "", n_moe),
        Candidate(LOGGING, moeplat_step(model, opt, x_BS, y_BS, stats=True), f"1 step in {every}", n_moe),
        Candidate(f"{BASELINE}, no ranges", no_ranges, "", n_moe),
    ]
    dense, dspec, how = _dense_model(spec_file, dense_spec, model, device)
    dense_step = moeplat_step(dense, build_optimizer(dspec.train, dense), x_BS, y_BS)
    cands.append(Candidate("moeplat:dense", dense_step, how, dense.num_params()))
    info = {"batch": list(x_BS.shape), "logits_max_abs_diff": {}, "stats_every": every}
    if hf:
        hf_cands, info["logits_max_abs_diff"] = hf_candidates(model, spec, x_BS, y_BS, device)
        cands += hf_cands
    if compiled:
        twin = copy.deepcopy(model)
        cands.append(Candidate(f"{BASELINE}, compiled", _compiled_step(twin, spec, x_BS, y_BS), "", n_moe))
    return cands, info


def _compiled_step(model: nn.Module, spec, x_BS, y_BS) -> Callable[[], None]:
    """torch.compile of the model (as train.compile does); the first call compiles, in warm-up."""
    model.compile()
    return moeplat_step(model, build_optimizer(spec.train, model), x_BS, y_BS)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(cands: list[Candidate], rounds: int, steps: int, warmup: int, device) -> dict[str, list]:
    """ms per step of each candidate per round, rounds interleaved; warm-up first (compiles too)."""
    live = [c for c in cands if c.step is not None]
    for c in live:
        t0 = time.perf_counter()
        for _ in range(warmup):
            c.step()
        _sync(device)
        if c.name.endswith("compiled"):
            c.note = f"warm-up incl. compile {time.perf_counter() - t0:.0f} s, excluded"
    times: dict[str, list[float]] = {c.name: [] for c in live}
    for _ in range(rounds):
        for c in live:
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step()
            _sync(device)
            times[c.name].append((time.perf_counter() - t0) * 1e3 / steps)
    return times


def e2e_bench(
    spec_file: str = REFERENCE_SPEC,
    dense_spec: str | None = None,
    *,
    rounds: int = 5,
    steps: int = 3,
    warmup: int = 2,
    profile_steps: int = 2,  # the profiler's own processing is ~0.7 ms per op event: ~6 s a step here
    compiled: bool = False,
    hf: bool = True,
    device: str = "cpu",
) -> dict:
    """The end-to-end table (ms per step, ratio to moeplat:moe) and the moeplat step's phases.

    `dense_spec` None: specs/quickstart-dense.yaml for the quick-start, else a derived counterpart."""
    from pathlib import Path

    from moeplat.bench.e2e_phases import profile_phases

    if dense_spec is None and Path(spec_file).resolve() == Path(REFERENCE_SPEC).resolve():
        dense_spec = REFERENCE_DENSE
    cands, info = build_candidates(spec_file, dense_spec, device, hf=hf, compiled=compiled)
    times = time_rounds(cands, rounds, steps, warmup, device)
    base = statistics.median(times[BASELINE])
    rows = []
    for c in cands:
        t = times.get(c.name, [])
        med = statistics.median(t) if t else None
        ratio = med / base if med is not None else None
        rows.append(
            {
                "candidate": c.name,
                "median_ms": med,
                "times_ms": t,
                "vs_moe": ratio,
                "params": c.params,
                "note": c.note,
            }
        )
    logging_step = next(c.step for c in cands if c.name == LOGGING)
    phases = profile_phases(logging_step, profile_steps)  # statistics included
    # what the statistics add to a run's mean step: the logging step's excess, 1 step in stats_every
    info["telemetry_share"] = (statistics.median(times[LOGGING]) / base - 1) / info["stats_every"]
    return {
        "spec": spec_file,
        "dense_spec": dense_spec,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "steps": steps,
        "warmup": warmup,
        **info,
        "rows": rows,
        "profile": phases,
    }


def format_e2e(r: dict) -> str:
    B, S = r["batch"]
    lines = [
        "",
        f"== end to end: {r['spec']}, batch {B} x {S}, fwd + bwd + AdamW, float32, {r['device']}, "
        f"{r['threads']} threads",
        f"{r['rounds']} interleaved rounds of {r['steps']} steps after {r['warmup']} warm-up steps; "
        "median of the rounds",
        f"{'candidate':<30} {'ms/step':>8} {'/moe':>6} {'params':>9}  note",
    ]
    for row in r["rows"]:
        if row["median_ms"] is None:
            lines.append(f"{row['candidate']:<30} {'skipped':>8} {'-':>6} {'-':>9}  {row['note']}")
            continue
        lines.append(
            f"{row['candidate']:<30} {row['median_ms']:>8.1f} {row['vs_moe']:>5.2f}x {row['params']:>9,}  {row['note']}"
        )
    p = r["profile"]
    lines += [
        f"routing statistics: the logging step {r['telemetry_share'] * r['stats_every']:+.1%} over "
        f"{BASELINE}; computed on 1 step in {r['stats_every']}, {r['telemetry_share']:+.2%} of a run's step time",
        "",
        f"== where the {LOGGING} goes: torch.profiler (CPU), {p['profiled_steps']} steps, "
        f"{p['step_ms']:.1f} ms/step profiled",
        f"{'phase':<42} {'ms/step':>8} {'share':>7}",
    ]
    lines += [f"{q['phase']:<42} {q['ms']:>8.1f} {q['share']:>7.1%}" for q in p["phases"]]
    cost_ms = p["ranges_per_step"] * p["range_us"] / 1e3
    lines.append(
        f"the phase ranges: {p['ranges_per_step']:.0f} per step at {p['range_us']:.1f} us each = "
        f"{cost_ms:.2f} ms/step unprofiled ({cost_ms / p['step_ms']:.2%}); "
        f"row '{BASELINE}, no ranges' times the step without them"
    )
    return "\n".join(lines)
