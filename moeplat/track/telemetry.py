"""No usage telemetry leaves a moeplat process unless its user opted in.

MLflow 3 sends usage telemetry by default: `import mlflow` builds its telemetry client, which
fetches a config from config.mlflow-telemetry.io and posts usage events, unless at import time
`MLFLOW_DISABLE_TELEMETRY` is true, `DO_NOT_TRACK` is "true", or it believes it runs in CI
(mlflow/telemetry/utils.py: is_telemetry_disabled, set_telemetry_client). huggingface_hub (which
the `hf` extra installs with transformers, for interop/) sends telemetry with its downloads unless
`HF_HUB_DISABLE_TELEMETRY` (or DO_NOT_TRACK) is set: moeplat downloads nothing from the Hub itself,
but user code in the same process might. Optuna, optuna-dashboard's server, Lightning and torch
send none (their sources have no such call).

So the variables are set before mlflow can be imported: moeplat.track (the only package that
imports mlflow) calls `no_telemetry()` when it is first imported, and so does the CLI entry, so
every process moeplat starts (sweep workers, job-server workers, their runs) inherits them.
`setdefault` keeps a user's explicit choice: `MLFLOW_DISABLE_TELEMETRY=false` in the environment
is the opt-in (README, "Telemetry"). The opt-in is an environment variable, not a spec key: consent
belongs to the machine and its user, not to a spec file shared across a team, and it has to be
known before mlflow is imported, which in the server and workers is before any spec is read.
"""

from __future__ import annotations

import os

OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def no_telemetry() -> None:
    """Turn telemetry off in this process and its children, unless the user set the variable."""
    for key, value in OFF.items():
        os.environ.setdefault(key, value)
