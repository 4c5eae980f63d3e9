"""`parallel.slurm`: where a SLURM job of this spec runs (sbatch's --partition, --account, --qos,
--time), read by `moeplat slurm` and so by the job server's SLURM bridge. Keys left out fall back
to the bridge's (or `moeplat slurm`'s) --partition/--account/--qos/--time, else the cluster's
defaults. The values go into a batch script's #SBATCH lines, so they are names and times only."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from moeplat.spec.base import Strict

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_TIME = re.compile(r"\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2}")


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a SLURM name: use letters, digits and _ . + - (as `sinfo` lists it)"
        )
    return value


def _time(value: str) -> str:
    if not _TIME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an sbatch --time: write minutes (90), HH:MM:SS (04:00:00) or D-HH:MM:SS (1-12:00:00)"
        )
    return value


SlurmName = Annotated[str, AfterValidator(_name)]
SlurmTime = Annotated[str, AfterValidator(_time)]


class SlurmSection(Strict):
    """sbatch options for a SLURM job of this spec (`moeplat slurm`, `moeplat worker --executor slurm`)."""

    partition: SlurmName | None = None
    account: SlurmName | None = None
    qos: SlurmName | None = None
    time: SlurmTime | None = Field(
        None,
        description="time limit; the run checkpoints and requeues on SLURM's warning before it (e.g. 04:00:00)",
    )

    def sbatch(self, defaults: dict[str, str | None] | None = None) -> list[str]:
        """`--key=value` for each key set here, else in `defaults`."""
        defaults = defaults or {}
        out = []
        for key in ("partition", "account", "qos", "time"):
            value = getattr(self, key) or defaults.get(key)
            if value:
                out.append(f"--{key}={value}")
        return out
