"""Server settings: one frozen dataclass, filled from keyword arguments or the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from moeplat.spec.safe_yaml import MAX_SPEC_BYTES

KiB = 1024
REPO = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _roots_from_env() -> tuple[Path, ...]:
    raw = os.environ.get("MOEPLAT_SPEC_ROOTS")
    if raw:
        return tuple(Path(p).resolve() for p in raw.split(os.pathsep) if p)
    return ((Path.cwd() / "specs").resolve(),)


def absolute_sqlite(url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + os.path.abspath(url.removeprefix(prefix))
    return url


@dataclass(frozen=True)
class ServerSettings:
    """What the server needs. `from_env` reads the MOEPLAT_* variables documented in docs/server.md."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    db_url: str = "sqlite:///moeplat-jobs.db"
    spec_roots: tuple[Path, ...] = field(default_factory=lambda: ((Path.cwd() / "specs").resolve(),))
    work_dir: Path = Path(".moeplat/server")
    tracking_uri: str = "sqlite:///mlflow.db"
    sweep_storage: str = "sqlite:///optuna.db"
    mlflow_ui_url: str | None = None
    dashboard_url: str | None = None
    max_spec_bytes: int = MAX_SPEC_BYTES  # the spec loader's own limit (moeplat.spec.safe_yaml)
    max_request_bytes: int = 1024 * KiB
    web_dir: Path = REPO / "web" / "dist"
    heartbeat_timeout_s: float = 60.0  # a running job silent this long is requeued or failed
    max_attempts: int = 2  # a job whose worker vanished is retried until it was claimed this often
    reap_every_s: float = 5.0
    max_log_bytes: int = 20 * 1024 * KiB  # per job; later output is dropped with a note

    def __post_init__(self) -> None:
        roots = tuple(Path(r).resolve() for r in self.spec_roots)
        assert roots, "at least one spec root"
        object.__setattr__(self, "spec_roots", roots)
        object.__setattr__(self, "work_dir", Path(self.work_dir).resolve())
        object.__setattr__(self, "web_dir", Path(self.web_dir))
        # jobs run in their own directories (and maybe machines): a relative SQLite path would move
        object.__setattr__(self, "tracking_uri", absolute_sqlite(self.tracking_uri))
        object.__setattr__(self, "sweep_storage", absolute_sqlite(self.sweep_storage))

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK

    @classmethod
    def from_env(cls, **overrides) -> ServerSettings:
        """Environment first, then `overrides` (CLI flags; None means "not given")."""
        env = os.environ.get
        values: dict = {
            "token": env("MOEPLAT_TOKEN") or None,
            "db_url": env("MOEPLAT_DB_URL", cls.db_url),
            "spec_roots": _roots_from_env(),
            "work_dir": Path(env("MOEPLAT_WORK_DIR", str(cls.work_dir))),
            "tracking_uri": env("MLFLOW_TRACKING_URI", cls.tracking_uri),
            "sweep_storage": env("MOEPLAT_SWEEP_STORAGE", cls.sweep_storage),
            "mlflow_ui_url": env("MOEPLAT_MLFLOW_UI_URL") or None,
            "dashboard_url": env("MOEPLAT_DASHBOARD_URL") or None,
            "web_dir": Path(env("MOEPLAT_WEB_DIR", str(cls.web_dir))),
        }
        if env("MOEPLAT_HEARTBEAT_TIMEOUT_S"):
            values["heartbeat_timeout_s"] = float(env("MOEPLAT_HEARTBEAT_TIMEOUT_S"))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
