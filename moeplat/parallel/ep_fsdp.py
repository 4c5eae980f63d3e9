"""Expert parallelism with an FSDP2 dense part: `parallel.strategy: {kind: expert_parallel,
dense: fsdp}`.

The routed experts are sharded over EP groups exactly as with `dense: ddp`
(moeplat.parallel.lightning.ExpertParallelMixin: E / ep_size experts per rank, tokens moved by
all-to-all, expert grads reduced over the EDP group only, sum / W). Everything else -- attention,
norms, embeddings, routers, shared experts -- is sharded with FSDP2 (`fully_shard`, ZeRO-3: one
unit per transformer block, then the root; Zhao et al. 2023, "PyTorch FSDP") over all W ranks,
with the expert weights passed as `ignored_params`, so FSDP neither shards, gathers nor
reduce-scatters them. FSDP2's reduce-scatter averages the dense grads over the world: the same
data-parallel convention as DDP, so W ranks still train as one process with the W-times batch.

Lightning's ModelParallelStrategy supplies the process group, the (data_parallel = W,
tensor_parallel = 1) mesh and the configure_model hook (LMSystem applies `parallelize` there, after
the experts are sharded, before the optimizer is built). Gradient clipping uses the global norm
(moeplat.parallel.clip: DTensor shards summed over the mesh, expert shards over the EP group).
Checkpoints hold the full single-process layout (moeplat.parallel.checkpoint gathers the DTensor
shards and the experts, and cuts them back on load), in one file written by rank 0, so a run
resumes at any ep_size and dense layout, one device included.
"""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

from moeplat.compile.trainer import fsdp_parallelize
from moeplat.parallel.grads import expert_parameters
from moeplat.parallel.lightning import ExpertParallelMixin


class ExpertParallelFSDPStrategy(ExpertParallelMixin, ModelParallelStrategy):
    """FSDP2 (ZeRO-3 over all W ranks) for the dense part, the routed experts over EP groups."""

    def __init__(self, *, world_size: int, **kwargs):
        super().__init__(
            data_parallel_size=world_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,  # one full-layout file (reloads at any ep_size)
            **kwargs,
        )

    def setup_environment(self) -> None:
        super().setup_environment()  # the default process group and the device mesh exist
        module = self._shard_experts()
        if module is not None:
            experts = [p for _, p, _ in expert_parameters(module)]
            module.parallelize = fsdp_parallelize(self.device_mesh, "full", ignored_params=experts)

    # ModelParallelStrategy loads the checkpoint into the model itself (torch.distributed.checkpoint
    # state dicts, which know nothing of EP shards); ours is a plain file in the full layout, loaded
    # by Lightning's usual path and cut to this rank by ExpertParallelMixin.

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = self.broadcast(checkpoint_path)
        return Strategy.load_checkpoint(self, path, weights_only=weights_only)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True
