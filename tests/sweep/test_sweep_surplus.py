"""n_trials exactly, with workers racing: the ranking of moeplat.sweep.study.surplus on a real
(SQLite) Optuna storage, trials made by hand in the states the workers leave them in."""

from __future__ import annotations

import optuna

from moeplat.sweep.study import SURPLUS_ATTR, finished_count, progress, remaining, surplus

State = optuna.trial.TrialState
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(tmp_path) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_the_later_of_two_racing_trials_gives_way(tmp_path):
    study = _study(tmp_path)
    done = study.ask()
    study.tell(done, 1.0)
    # two workers both saw one trial left and started one each
    a, b = study.ask(), study.ask()
    assert not surplus(study, a.number, 2) and surplus(study, b.number, 2)
    b.set_user_attr(SURPLUS_ATTR, True)
    study.tell(b, state=State.PRUNED)
    study.tell(a, 2.0)
    assert finished_count(study) == 2 and remaining(study, 2) == 0
    assert progress(study, 2) == {
        "n_trials": 2,
        "finished": 2,
        "complete": 2,
        "pruned": 0,
        "failed": 0,
        "running": 0,
        "waiting": 0,
    }


def test_a_retry_takes_the_place_of_the_trial_it_retries(tmp_path):
    """A dead worker's trial is failed and re-queued (Optuna's retry_history): the retry, numbered
    after trials that started meanwhile, still counts in place of the failed one."""
    study = _study(tmp_path)
    dead, other = study.ask(), study.ask()
    study.tell(dead, state=State.FAIL)
    study.tell(other, 1.0)
    study.enqueue_trial({}, user_attrs={})
    retry = study.ask()  # the WAITING trial, now running
    study._storage.set_trial_system_attr(retry._trial_id, "retry_history", [dead.number])
    assert not surplus(study, retry.number, 2)
    extra = study.ask()  # a second worker that started a trial at the same time
    assert surplus(study, extra.number, 2)


def test_an_interrupted_trial_below_leaves_room(tmp_path):
    study = _study(tmp_path)
    first, stopped = study.ask(), study.ask()
    stopped.set_user_attr("interrupted", True)
    study.tell(stopped, state=State.FAIL)
    later = study.ask()
    assert not surplus(study, first.number, 2) and not surplus(study, later.number, 2)
