"""`train.samples`: the model being trained continues the spec's prompts at every checkpoint and at
the end of training; each time one MLflow table samples/step_<N>.json (prompt, completion, step,
settings) goes into the run, and the same JSON into run_dir/samples/, so the MLflow UI shows how
variants write as they train.

Rank 0 only, on the unwrapped model (no collective runs in it): strategies that shard parameters
or experts across ranks (fsdp, expert_parallel) get no samples, with a warning. Sampling uses the
spec's seed at every checkpoint, so two checkpoints differ by their weights only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

from moeplat.errors import SpecError, SpecIssue
from moeplat.nn.generate import generate, length_problem

log = logging.getLogger(__name__)

SHARDED = ("fsdp", "expert_parallel")  # a forward on rank 0 alone would wait for the other ranks


def samples_callback(spec, tokenizer, out_dir: str | Path) -> TrainSamples | None:
    """The callback for `train.samples` (None when unset or on a sharded strategy). The prompts
    are encoded here, at the start of the run: too long a prompt is a SpecError now, not at the
    first checkpoint."""
    samples = spec.train.samples
    if samples is None:
        return None
    if spec.parallel.strategy.kind in SHARDED:
        log.warning(
            "train.samples: not generated under strategy %s (sharded model)", spec.parallel.strategy.kind
        )
        return None
    prompt_ids = [ids.tolist() for ids in tokenizer.encode_texts(list(samples.prompts))]
    for i, ids in enumerate(prompt_ids):
        problem = length_problem(len(ids), samples.max_new_tokens, spec.model.max_seq_len, "max_new_tokens")
        if problem:
            path = "train.samples.max_new_tokens" if ids else f"train.samples.prompts.{i}"
            raise SpecError(SpecIssue(path, f"prompt {i}: {problem}"))
    return TrainSamples(samples, prompt_ids, tokenizer, out_dir)


class TrainSamples(L.Callback):
    def __init__(self, samples, prompt_ids: list[list[int]], tokenizer, out_dir: str | Path, tracked=None):
        """`samples`: the SamplesSpec; `tracked`: the run's TrackedRun (None: files only)."""
        self.samples, self.prompt_ids, self.tok = samples, prompt_ids, tokenizer
        self.out_dir, self.tracked = Path(out_dir), tracked
        self._done_at: int | None = None  # a checkpoint and last.ckpt at one step write once

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.write(pl_module.model, trainer.global_step, trainer.is_global_zero)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(pl_module.model, trainer.global_step, trainer.is_global_zero)

    def table(self, model, step: int) -> dict[str, list]:
        """Columns prompt, completion, step, settings: one row per prompt."""
        s = self.samples
        gen = generate(
            model,
            self.prompt_ids,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
            eos_id=self.tok.eos_id,
        )
        settings = json.dumps(s.model_dump(exclude={"prompts"}))
        n = len(s.prompts)
        completions = [self.tok.decode(ids) for ids in gen.tokens]
        return {
            "prompt": list(s.prompts),
            "completion": completions,
            "step": [step] * n,
            "settings": [settings] * n,
        }

    def write(self, model, step: int, is_global_zero: bool = True) -> None:
        """Generate and log once per step. A failure is logged, never fatal: samples must not cost
        a training run."""
        if not is_global_zero or step == self._done_at:
            return
        self._done_at = step
        try:
            data = self.table(model, step)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            name = f"step_{step}.json"
            (self.out_dir / name).write_text(json.dumps(data, indent=1, ensure_ascii=False))
            if self.tracked is not None:
                self.tracked.log_table(data, f"samples/{name}")
        except Exception:
            log.warning(
                "train.samples: could not generate or log the samples at step %d", step, exc_info=True
            )
