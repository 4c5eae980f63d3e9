"""What a run leaves besides its metric rows: the tokenizer file, the final model artifact and the
run-level summary figures (moeplat.train.run calls these at its start and end)."""

from __future__ import annotations

from pathlib import Path

from moeplat.spec import LoadedSpec


def save_tokenizer(datamodule, run_dir: Path, tracked) -> None:
    """tokenizer.json in the run directory and as the MLflow artifact tokenizer/tokenizer.json, so
    the run's token ids can be decoded later (the byte tokenizer has no file: ids are bytes)."""
    tok = getattr(datamodule, "tokenizer", None)
    path = tok.save(run_dir) if tok is not None else None
    if path is not None and tracked:
        tracked.log_artifact(str(path), "tokenizer")


def log_model(trainer, system, tracked, loaded: LoadedSpec, run_dir: Path) -> None:
    """The final weights and resolved spec as the run's model/ artifact (moeplat.train.model_artifact).
    Every rank takes part in gathering the state dict (sharded strategies); rank 0 writes it."""
    from moeplat.train.model_artifact import save_model_artifact

    state_dict = trainer.strategy.lightning_module_state_dict()
    if tracked:
        save_model_artifact(
            tracked, state_dict, loaded, run_dir, trainer.global_step, system.last_val.get("val/loss")
        )


def log_summary(tracked, logger, corpus, step: int, wall_s: float, throughput) -> None:
    """Run-level figures; val/loss itself was logged by the last validation. Through the logger,
    which sends what this attempt still holds first (a resumed attempt logs them once more, at
    its own last step, unless an earlier attempt already did at this step)."""
    rows = {
        "data/unigram_baseline": corpus.unigram_baseline,
        **{
            f"data/{k}": getattr(corpus, k)
            for k in ("unigram_baseline_bpb", "bytes_per_token")
            if getattr(corpus, k, None) is not None
        },
        "perf/wall_s": wall_s,
        "perf/tokens_seen": step * throughput.tokens_per_step,
    }
    logger.release()
    logger.log_metrics(rows, step=step)
    logger.finalize("success")
    if throughput.device_name:  # known once training started
        tags = {"moeplat.device_name": throughput.device_name}
        if throughput.peak_tflops:
            tags["moeplat.peak_tflops"] = throughput.peak_tflops
        tracked.set_tags(tags)
