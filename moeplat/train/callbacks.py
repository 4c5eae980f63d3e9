"""Training callbacks that are ours (Lightning provides checkpointing and the progress bar)."""

from __future__ import annotations

import time

import lightning as L
import torch

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s per GPU, from the vendor data sheets; matched
# against torch.cuda.get_device_name() in order, the first substring that occurs wins. MFU
# (Chowdhery et al. 2022, PaLM, app. B) is reported against this peak whatever train.precision is.
PEAK_TFLOPS_BF16 = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM; H100 NVL is close (835)
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 tensor cores (no bf16 on Volta)
    ("T4", 65.0),  # fp16
)


def peak_tflops_for(device_name: str) -> float | None:
    """The table's peak for a GPU name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    for key, tflops in PEAK_TFLOPS_BF16:
        if key in device_name:
            return tflops
    return None


def device_name(trainer) -> str:
    device = trainer.strategy.root_device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class Throughput(L.Callback):
    """Tokens per second, model FLOP/s, MFU and learning rate over the last `every` optimizer steps,
    and tokens seen so far.

    Wall time between optimizer steps includes data loading, forward, backward and the optimizer;
    validation time is excluded (the window restarts after each validation). perf/flops_per_s =
    tokens/s x `flops_per_token` (training FLOPs, moeplat.spec.plan: 3 x forward matmuls, all
    devices together as tokens_per_step is); perf/mfu = that / (`devices` x peak of one device),
    logged only when the peak is known: `peak_tflops`, else looked up by GPU name (none on CPU).
    """

    def __init__(
        self,
        tokens_per_step: int,
        every: int,
        flops_per_token: int = 0,
        peak_tflops: float | None = None,
        devices: int = 1,
    ):
        self.tokens_per_step = tokens_per_step
        self.every = every
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.devices = devices
        self.device_name: str | None = None
        self._t0: float | None = None
        self._step0 = 0
        self.tokens_per_s: float | None = None
        self.mfu: float | None = None

    def _restart(self, trainer) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self.device_name = device_name(trainer)
        if self.peak_tflops is None:
            self.peak_tflops = peak_tflops_for(self.device_name)
        self._restart(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = trainer.global_step - self._step0
        if self._t0 is None or steps < self.every:
            return
        elapsed = time.perf_counter() - self._t0
        self.tokens_per_s = steps * self.tokens_per_step / elapsed
        flops_per_s = self.tokens_per_s * self.flops_per_token
        metrics = {
            "perf/tokens_per_s": self.tokens_per_s,
            "perf/flops_per_s": flops_per_s,
            "perf/tokens_seen": float(trainer.global_step * self.tokens_per_step),
            "train/lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        if self.peak_tflops:
            self.mfu = flops_per_s / (self.devices * self.peak_tflops * 1e12)
            metrics["perf/mfu"] = self.mfu
        pl_module.log_dict(metrics)
        self._restart(trainer)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run cannot recover from that."""


class FiniteLoss(L.Callback):
    """Stop at the first non-finite training loss with a clear reason, instead of training on NaN."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training loss is {float(loss)} at step {trainer.global_step}: lower train.optimizer.lr, "
                "set train.grad_clip, or check the data"
            )


class ResumeMetrics(L.Callback):
    """Tells the tracking logger the step training (re)starts at (moeplat.track.logger): of the
    metrics an earlier attempt journalled, those of steps before it are kept, the others are trained
    and logged again."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path and trainer.is_global_zero:
            print(f"resumed at step {trainer.global_step} from {trainer.ckpt_path}", flush=True)
        start = getattr(trainer.logger, "start", None)
        if start is not None:
            start(trainer.global_step)
