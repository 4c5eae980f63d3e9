"""Two runs starting at once both find their experiment missing; the second create must not fail."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from moeplat.track.spool import experiment_id


class LateLooker:
    """A client whose first lookup misses an experiment another process has just created."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.lookups = 0

    def get_experiment_by_name(self, name):
        self.lookups += 1
        return None if self.lookups == 1 else self.client.get_experiment_by_name(name)

    def create_experiment(self, name):
        return self.client.create_experiment(name)


def test_loser_of_the_create_race_takes_the_winners_experiment(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    winner = client.create_experiment("race")  # the other process, between our lookup and create
    racer = LateLooker(client)
    assert experiment_id(racer, "race") == winner
    assert racer.lookups == 2
    assert experiment_id(client, "race") == winner  # found at once when it exists


def test_a_create_that_fails_for_another_reason_is_raised(tmp_path):
    class Broken(LateLooker):
        def create_experiment(self, name):
            raise PermissionError("read-only store")

    with pytest.raises(PermissionError):
        experiment_id(Broken(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")), "nope")
