"""Fixtures for the sweep tests: a real PostgreSQL server, tiny sweep files, `moeplat` processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from mlflow import MlflowClient

# tests/ is on sys.path (pytest's default rootdir-relative import of tests/conftest.py).
from postgres import postgres_url  # noqa: F401  (a fixture: pytest finds it by name here)

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


@pytest.fixture(scope="session")
def write_sweep() -> Callable[..., Path]:
    """write_sweep(directory, name, **fields) -> directory/name.yaml, a sweep over tests/fixtures/tiny.yaml
    (`extends:` by a path relative to the sweep file, as users write it)."""

    def write(directory: Path, name: str, **fields) -> Path:
        path = directory / f"{name}.yaml"
        body = {"name": name, "extends": os.path.relpath(TINY, directory), **fields}
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread, in this process and in the moeplat processes a test starts. The tiny
    models gain nothing from more, and on a machine shared with other work OpenMP's spinning threads
    make every step about 10x slower (2 cores, load 3.6: 50 steps 18 s on 2 threads, 1.8 s on 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> Callable[[Path], str]:
    """mlflow_store(directory) -> the URI of a new, empty MLflow store at directory/mlflow.db.
    A copy of one made once: creating MLflow's schema takes seconds, a copy milliseconds."""
    template = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(template)  # MLflow puts the default experiment's artifacts under the cwd
        MlflowClient(f"sqlite:///{template / 'mlflow.db'}").search_experiments()

    def make(directory: Path) -> str:
        shutil.copy(template / "mlflow.db", directory / "mlflow.db")
        return f"sqlite:///{directory / 'mlflow.db'}"

    return make


class MoeplatProcess:
    """`python -m moeplat.cli.main ARGS` in its own process, output to cwd/<log>."""

    def __init__(self, args: list[str], cwd: Path, log: str):
        env = {
            k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MOEPLAT_SWEEP_STORAGE")
        }
        self.log = cwd / log
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moeplat.cli.main", *args],
                cwd=cwd,
                env={**env, "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"moeplat did not exit within {timeout}s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def moeplat_process() -> Callable[..., MoeplatProcess]:
    """moeplat_process(args, cwd, log="moeplat.log") -> a running moeplat command; killed at the end."""
    started: list[MoeplatProcess] = []

    def start(args: list[str], cwd: Path, log: str = "moeplat.log") -> MoeplatProcess:
        started.append(MoeplatProcess(args, cwd, log))
        return started[-1]

    yield start
    for p in started:
        p.kill()


def _study_exists(url: str, name: str) -> bool:
    """Whether `url` holds study `name` yet, without creating anything (no file, no tables)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return False
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            query = sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = :name")
            return conn.execute(query, {"name": name}).first() is not None
    except sqlalchemy.exc.DBAPIError:  # the process has not created the tables yet
        return False
    finally:
        engine.dispose()


def wait_for_trial(
    storage_url: str,
    study_name: str,
    found: Callable[[list[optuna.trial.FrozenTrial]], optuna.trial.FrozenTrial | None],
    process: MoeplatProcess,
    timeout: float = 180,
) -> optuna.trial.FrozenTrial:
    """Poll the study that `process` creates until `found(trials)` returns a trial."""
    deadline = time.monotonic() + timeout
    study = None
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            pytest.fail(f"moeplat exited ({process.proc.returncode}) too early:\n{process.output()[-3000:]}")
        if study is None and _study_exists(storage_url, study_name):
            study = optuna.load_study(study_name=study_name, storage=storage_url)
        if study is not None and (trial := found(study.get_trials(deepcopy=False))):
            return trial
        time.sleep(0.05)
    pytest.fail(f"no such trial within {timeout}s:\n{process.output()[-3000:]}")


@pytest.fixture(scope="session")
def poll_trial() -> Callable[..., optuna.trial.FrozenTrial]:
    return wait_for_trial
