"""Plan vs measured memory: `moeplat plan`'s training-memory estimate (moeplat.spec.plan.memory_estimate)
against the peak of one real training step of the same spec, in one process.

The step is the textbook one that `moeplat run` performs (as bench/step.py's plain loop): forward
on a [batch_size, seq_len] batch, (loss + aux).backward(), gradient clipping, AdamW step,
zero_grad(set_to_none=True). One step runs first so that AdamW's moments exist; the second is
measured (the steady state the estimate describes).

Measured peak, bytes live at the step's highest point, everything included (weights, RoPE tables,
moments, the batch, activations, gradients, temporaries):
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (what the caching allocator
  handed out; its cached-but-free blocks are not counted, nor is the CUDA context), less what was
  allocated before the step that is no tensor of the model, optimizer or batch (the cuBLAS and
  attention workspaces the first step left: tens of MiB, which would swamp the minis' figures).
- CPU: the bytes live when the step starts (every parameter, buffer, optimizer state and batch
  tensor, unique storages) plus the highest running sum of torch.profiler's allocation events
  (profile_memory=True: each allocation and free of torch's CPU allocator during the step, in
  order). tracemalloc does not see torch's allocator; RSS sees the allocator's caching and the
  Python heap. tests/bench/test_memory.py checks this method on allocations of known sizes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from moeplat.bench.layer import _stderr_fd_silenced


@dataclass(frozen=True)
class MemoryRow:
    spec: str
    device: str
    estimate_bytes: int  # `moeplat plan`'s memory per device, total (moeplat.spec.preflight)
    measured_bytes: int  # peak of one training step
    estimate: dict  # its breakdown: weights, grads, optimizer, activations, all_to_all_buffers, total

    @property
    def ratio(self) -> float:
        """estimate / measured: 1.0 is exact, > 1 an over-estimate."""
        return self.estimate_bytes / self.measured_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def live_bytes(tensors) -> int:
    """Bytes of the unique storages behind `tensors` (a tied weight, a view: counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def profiled_peak_delta(fn) -> int:
    """Highest bytes allocated on the CPU by torch during fn(), over what was live before it:
    the running sum of the profiler's allocation (+) and free (-) events, in time order. A block
    allocated before the profile and freed inside it is not reported by torch (a conservative miss:
    the figure can only read high)."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_fd_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def saved_for_backward_bytes(spec, device: torch.device) -> int:
    """Bytes of the unique storages autograd keeps for backward in one training forward of `spec`
    (torch.autograd.graph.saved_tensors_hooks), plus the logits the step holds; parameters,
    buffers and the batch excluded. What plan's activation count describes, less the head's
    backward gradients."""
    from moeplat.compile.model import build_model

    model = build_model(spec).to(device).train()
    x, y = _batch(spec, device)
    torch.manual_seed(spec.train.seed)
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x, y)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in held:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(spec, device):
        out = model(x, y)
    return sum(saved.values()) + out.logits_BSV.untyped_storage().nbytes()


def _batch(spec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token targets, [batch_size, seq_len] each, seeded by train.seed."""
    V, B, S = spec.model.vocab_size, spec.train.batch_size, spec.data.seq_len
    g = torch.Generator().manual_seed(spec.train.seed)
    tokens = torch.randint(V, (B, S + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def _autocast(spec, device: torch.device):
    """Lightning's mixed precision: autocast to bf16 / fp16 around the forward."""
    dtypes = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    dtype = dtypes.get(spec.train.precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def _step(spec, device: torch.device):
    """(training-step function, the tensors live between steps) for `spec` on `device`."""
    from moeplat.compile.model import build_model
    from moeplat.compile.optim import build_optimizer

    model = build_model(spec).to(device).train()
    opt = build_optimizer(spec.train, model)
    torch.manual_seed(spec.train.seed)  # routers that sample (gshard's second expert, noise)
    x, y = _batch(spec, device)

    def step() -> None:
        with _autocast(spec, device):
            out = model(x, y)
        (out.loss + out.aux_loss).backward()
        if spec.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def held():
        yield from model.parameters()
        yield from model.buffers()
        for state in opt.state.values():
            yield from state.values()
        yield from (x, y)

    return step, held


def measure_step_peak(spec, device: torch.device) -> int:
    """Peak bytes of one steady-state training step of `spec` on `device` (see the module doc)."""
    step, held = _step(spec, device)
    step()  # creates AdamW's moments
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # allocated but no tensor of the model, optimizer or batch: cuBLAS / attention workspaces
        workspaces = torch.cuda.memory_allocated(device) - live_bytes(held())
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - max(workspaces, 0)
    return live_bytes(held()) + profiled_peak_delta(step)


def compare(spec_file: str, device: torch.device, overrides: list[str] | None = None) -> MemoryRow:
    """Plan's estimate and the measured step peak of one spec file."""
    from moeplat.spec import load_spec
    from moeplat.spec.plan import plan
    from moeplat.spec.preflight import preflight

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    spec = load_spec(spec_file, [f"parallel.accelerator={accelerator}", *(overrides or [])]).spec
    est = preflight(spec, plan(spec)).memory_bytes  # per device: activation checkpointing included
    measured = measure_step_peak(spec, device)
    return MemoryRow(spec.name, str(device), est["total"], measured, dict(est))
