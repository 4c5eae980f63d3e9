"""The LightningModule: language-model loss plus router losses, and MoE telemetry.

Metric names group in the MLflow UI: train/*, val/*, perf/*, moe/layerNN/*, moe/all/* (see
moeplat.nn.stats.moe_metrics for the MoE names).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from moeplat.compile.optim import UpdateSchedule, count_trainable, partition
from moeplat.nn.balance import StepLoad, count_step_load
from moeplat.nn.stats import moe_metrics, world_stats
from moeplat.train.specialization import SourceLoad, SourceRouting, source_load, specialization_metrics

log = logging.getLogger(__name__)


class LMSystem(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        configure: Callable[[nn.Module], tuple[torch.optim.Optimizer, object]],
        *,
        log_every: int = 10,
        moe_log_every: int | None = None,
        updates: UpdateSchedule | None = None,
    ):
        """`updates` holds parameter groups still at some steps (freeze, router warm-up,
        alternating updates; moeplat.compile.optim.build_update_schedule). `moe_log_every`:
        optimizer steps between MoE telemetry logs (None = log_every)."""
        super().__init__()
        self.model = model
        self._configure = configure
        self.log_every = log_every
        self.moe_log_every = moe_log_every or log_every
        # (step, metrics) of the latest MoE telemetry, read by callbacks (moeplat.train.plots)
        self.moe_telemetry: tuple[int, dict[str, float]] | None = None
        self.updates = updates
        self._held: frozenset[str] = frozenset()  # groups the current optimizer step does not update
        self.trainable_params: int | None = None
        self.last_val: dict[str, float] = {}
        self._val_sums: dict[int, list[float]] = {}  # validation set -> [loss nats, tokens, bytes]
        self._routing = SourceRouting()  # routed counts per validation set and MoE layer
        # the last validation's expert load per source (several sources), read by MoEPlots
        self.val_source_load: SourceLoad | None = None
        self._step_load: dict[int, torch.Tensor] = {}  # layer -> routed load summed over this step
        # global-batch load balancing with accumulation: this step's expert frequencies, counted
        # by the routing pre-pass at its first micro-batch (moeplat.nn.balance)
        self._balance_plan: StepLoad | None = None
        self._announced_pre_pass = False
        # EP group size when the experts are sharded (set by moeplat.parallel.lightning); > 1 adds
        # the per-rank expert load to the MoE telemetry
        self.expert_shards = 1
        # set by a strategy that shards the model itself (FSDP2, moeplat.compile.trainer): applied
        # once to the model in configure_model, after the process group exists, before the optimizer
        self.parallelize: Callable[[nn.Module], None] | None = None

    def configure_model(self) -> None:
        if self.parallelize is not None:
            self.parallelize(self.model)
            self.parallelize = None
            if self.updates is not None:  # FSDP2 replaced the parameters: holds refer to the new ones
                self.updates = dataclasses.replace(self.updates, groups=partition(self.model))

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None):
        return self.model(idx_BS, targets_BS)

    def training_step(self, batch, batch_idx):
        x_BS, y_BS, *ahead = batch  # ahead: the step's inputs, at its first micro-batch (step_group)
        step_load = self._global_step_load(batch_idx, ahead)
        logs_moe = self._logs_moe()  # routing statistics only where they are logged
        kw = {"stats": logs_moe} if step_load is None else {"step_load": step_load, "stats": logs_moe}
        out = self.model(x_BS, y_BS, **kw)
        loss = out.loss + out.aux_loss
        # sync_dist: under data parallelism the logged loss is the global batch's (mean of the ranks'
        # equal-sized shards), not rank 0's shard; a no-op on one device.
        self.log("train/loss", out.loss.detach(), prog_bar=True, sync_dist=True)
        self.log("train/aux_loss", out.aux_loss.detach())
        for layer, o in out.moe.items():
            prev = self._step_load.get(layer)
            self._step_load[layer] = o.load_E if prev is None else prev + o.load_E
        if logs_moe:
            self._log_moe(out.moe)
        return loss

    def _logs_moe(self) -> bool:
        """Whether this training forward's MoE telemetry is logged: the first micro-batch of every
        moe_log_every-th optimizer step (the same step on every rank, so world_stats' collective
        and the statistics it reads are there on all of them or on none)."""
        step = self.global_step
        return step % self.moe_log_every == 0 and (
            self.moe_telemetry is None or self.moe_telemetry[0] != step
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        """After backward (all micro-batches), before gradient clipping and the step: the groups
        held at this step lose their gradients, so AdamW skips them (no update, no weight decay)
        and the clipping norm is that of the parameters that are updated."""
        if self.updates is not None:
            self._held = self.updates.hold(self.global_step)

    def optimizer_step(self, *args, **kwargs) -> None:
        """After-step hook: once the optimizer has stepped, routers with online state (the
        aux-loss-free bias of sigmoid_bias routing) update from the load routed during the step
        (all its micro-batches), via TransformerLM.after_optimizer_step; not while the router is
        held (frozen, warming up, or outside its alternating phase)."""
        super().optimizer_step(*args, **kwargs)
        if self._step_load and "router" not in self._held and hasattr(self.model, "after_optimizer_step"):
            self.model.after_optimizer_step(self._step_load)
        self._step_load = {}
        self._balance_plan = None

    def _global_step_load(self, batch_idx: int, ahead: list) -> StepLoad | None:
        """The expert frequencies of this optimizer step for layers whose load-balancing loss has
        scope global_batch (moeplat.nn.balance), None without such layers. One micro-batch per
        step: reduced over the ranks inside the forward. Several: the first one brings the step's
        inputs (the loader's look-ahead, moeplat.data.resumable), routed once without gradients."""
        layers = _global_balance_layers(self.model)
        if not layers:
            return None
        trainer = self._trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        world_counts = any(getattr(m, "losses_over_world", False) for m in layers)
        reduce = None
        if trainer is not None and trainer.world_size > 1 and not world_counts:
            reduce = functools.partial(trainer.strategy.reduce, reduce_op="sum")
        if accumulate == 1:
            return StepLoad(reduce=reduce)
        starts = batch_idx % accumulate == 0
        if ahead and starts:
            if not self._announced_pre_pass:
                self._announced_pre_pass = True
                log.info(
                    "global-batch load balancing: a routing pre-pass over each step's %d micro-batches",
                    accumulate,
                )
            self._balance_plan = count_step_load(self.model, ahead[0], reduce)
        elif ahead or starts or self._balance_plan is None:
            raise RuntimeError(
                "global-batch load balancing with train.grad_accum > 1 needs each step's micro-batches "
                "up front: build the training loader with step_group = grad_accum "
                "(moeplat.compile.data.step_group)"
            )
        return self._balance_plan

    def _log_moe(self, moe: dict) -> None:
        """Per-layer router telemetry and its means over layers (moeplat.nn.stats.moe_metrics).

        Sent to the logger directly at this step: self.log would only reach it at Lightning's
        log_every_n_steps (train.log_every), whatever train.moe_log_every says."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # the whole data-parallel batch's statistics, not rank 0's shard's
            metrics = moe_metrics(
                world_stats(moe, lambda t: self.trainer.strategy.reduce(t, reduce_op="mean"))
            )
        else:
            metrics = moe_metrics(moe)
        if not metrics:
            return
        if self.expert_shards > 1:
            metrics.update(_ep_rank_load(moe, self.expert_shards))
        self.moe_telemetry = (self.global_step, metrics)
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=self.global_step)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}
        self._routing = SourceRouting()

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """Sums, per validation set (a mixture's source), of loss in nats, scored tokens and the
        UTF-8 bytes those tokens stand for. Targets IGNORE (-100) pad a rank's shard
        (moeplat.data.datamodule.ValShardSampler) and count nowhere."""
        x_BS, y_BS = batch
        scored_BS = y_BS != -100
        n = int(scored_BS.sum())
        if n == 0:  # a batch of padding only: the forward still runs for collectives (EP)
            self._routing.add(dataloader_idx, self.model(x_BS, None, stats=False).moe, scored=False)
            return
        rows_B = scored_BS.any(dim=1)
        if self.expert_shards == 1 and not rows_B.all():
            # padding sequences score nothing, but routed they would count as the source's tokens
            # in the expert load per source; under EP every rank routes its whole batch (all-to-all)
            x_BS, y_BS, scored_BS = x_BS[rows_B], y_BS[rows_B], scored_BS[rows_B]
        out = self.model(x_BS, y_BS, stats=False)  # validation reads routed_E only (SourceRouting)
        self._routing.add(dataloader_idx, out.moe)
        sums = self._val_sums.setdefault(dataloader_idx, [0.0, 0.0, 0.0])
        sums[0] += float(out.loss) * n
        sums[1] += n
        sums[2] += self._scored_bytes(y_BS[scored_BS])

    def _scored_bytes(self, targets_T: torch.Tensor) -> float:
        table = getattr(self._datamodule(), "token_bytes", None)
        if table is None:
            return float(targets_T.numel())  # one byte per token: the byte tokenizer
        return float(table[targets_T.cpu()].sum())

    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def on_validation_epoch_end(self) -> None:
        names = list(getattr(self._datamodule(), "val_names", None) or [""])
        sums_S3 = torch.tensor(
            [self._val_sums.get(i, [0.0, 0.0, 0.0]) for i in range(len(names))], dtype=torch.float64
        )
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank scored its own share of each set: the sums over ranks are the whole set's.
            sums_S3 = self.trainer.strategy.reduce(sums_S3.to(self.device), reduce_op="sum").cpu()
        total = sums_S3.sum(0)
        if total[1] == 0:
            return
        metrics = _val_metrics("val", total)  # token-weighted over every set, all sources together
        if len(names) > 1 or names[0]:
            for name, sums in zip(names, sums_S3):
                if sums[1] > 0:
                    metrics.update(_val_metrics(f"val/{name}", sums))
            metrics.update(self._specialization(names))
        self.last_val = {**metrics, "step": self.global_step}
        if not self.trainer.sanity_checking:
            # already the whole world's numbers; sync_dist averages equal values (and tells
            # Lightning so, which otherwise warns about epoch-level metrics under DDP)
            sync = self.trainer.world_size > 1
            self.log("val/loss", metrics["val/loss"], prog_bar=True, sync_dist=sync)
            for key, value in metrics.items():
                if key != "val/loss":
                    self.log(key, value, sync_dist=sync)

    def _specialization(self, names: list[str]) -> dict[str, float]:
        """moe/specialization and per layer (moeplat.train.specialization) over the whole world's
        validation tokens; keeps the counts for the heatmap (not at the sanity check)."""
        if len(names) < 2:
            return {}
        reduce = None
        over_world = any(getattr(m, "losses_over_world", False) for m in self.model.modules())
        if self._trainer is not None and self.trainer.world_size > 1 and not over_world:
            reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
        found = self._routing.counts(len(names), reduce)
        if found is None:  # a dense model
            return {}
        layers, counts_SLE = found
        if not self.trainer.sanity_checking:
            self.val_source_load = source_load(self.global_step, names, layers, counts_SLE)
        return specialization_metrics(names, layers, counts_SLE)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Dropout and any stochastic routing draw from these: a resumed run continues the streams.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        if self.logger is not None and self.trainable_params is not None:
            self.logger.log_metrics({"train/trainable_params": self.trainable_params}, step=self.global_step)
        # Restored here, after Lightning's own setup has drawn any random numbers it needs.
        rng = getattr(self, "_rng_to_restore", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._rng_to_restore = None

    def configure_optimizers(self):
        optimizer, scheduler = self._configure(self.model)
        self.trainable_params = count_trainable(optimizer)
        total = sum(p.numel() for p in self.model.parameters())
        log.info("training %d of %d parameters", self.trainable_params, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _val_metrics(prefix: str, sums) -> dict[str, float]:
    """loss (nats/token), ppl and bpb (bits per UTF-8 byte: nats / (ln 2 x bytes), comparable
    across tokenizers) of one validation set's sums [nats, tokens, bytes]."""
    nats, tokens, nbytes = (float(v) for v in sums)
    loss = nats / tokens
    out = {f"{prefix}/loss": loss, f"{prefix}/ppl": math.exp(min(loss, 50.0))}
    if nbytes > 0:
        out[f"{prefix}/bpb"] = nats / (math.log(2) * nbytes)
    return out


def _global_balance_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers (plain, or sharded: ExpertParallelMoE keeps its MoELayer as _moe) whose
    switched-on load-balancing loss counts f over the global batch."""
    found = []
    for m in model.modules():
        layer = getattr(m, "_moe", m)
        coefs = getattr(layer, "loss_coefs", {})
        if getattr(layer, "balance_loss_scope", None) == "global_batch" and coefs.get("load_balancing"):
            found.append(m)
    return found


def _ep_rank_load(moe: dict, ep_size: int) -> dict[str, float]:
    """moe/layerNN/ep_load/rJJ: the share of the layer's routed token-slots that EP rank J's
    experts (the J-th contiguous slice of E / ep_size) computed -- the per-rank expert load. Under
    expert parallelism the layer's load_E is that of the whole data-parallel world (balance_scope
    "global"), so rank 0 reports every rank's load."""
    metrics = {}
    for layer, out in sorted(moe.items()):
        load_E = out.stats.load_E.float()
        for j, share in enumerate(load_E.view(ep_size, -1).sum(1).tolist()):
            metrics[f"moe/layer{layer:02d}/ep_load/r{j:02d}"] = share
    return metrics
