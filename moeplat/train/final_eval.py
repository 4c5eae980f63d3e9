"""train.eval at the end of `moeplat run`: downstream tasks on the final weights (moeplat.train.run
calls run_final_eval after the final validation, before the MLflow run is closed)."""

from __future__ import annotations

import logging

from moeplat.spec import LoadedSpec

log = logging.getLogger(__name__)


def run_final_eval(trainer, loaded: LoadedSpec, datamodule, rank: int, final_eval) -> None:
    """train.eval: downstream tasks on the final weights, logged as eval/<task>/<metric> at the last
    step. Task evaluation lives in moeplat.evaluate, above train, so the caller passes it in as
    `final_eval(loaded, model, tokenizer) -> metrics` (`moeplat run` does, a sweep trial does not).
    A failure here is logged and leaves the trained run FINISHED: its weights are already saved."""
    from moeplat.compile.model import build_model
    from moeplat.train.model_artifact import PREFIX

    state = trainer.strategy.lightning_module_state_dict()  # every rank: sharded strategies gather
    if rank != 0:
        return
    if final_eval is None:
        log.warning("train.eval is set, but this caller runs no tasks: use `moeplat eval RUN --tasks ...`")
        return
    model = build_model(loaded.spec)  # a plain copy: not compiled, not sharded, on one device
    model.load_state_dict({k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)})
    try:
        metrics = final_eval(loaded, model.eval(), datamodule.tokenizer)
    except Exception:
        log.exception("train.eval failed (the run itself is complete)")
        return
    for key, value in metrics.items():
        log.info("%s %.6g", key, value)
    if trainer.logger:
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
