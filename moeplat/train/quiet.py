"""Library chatter off in a process that trains: moeplat's progress bar and summary are the
console output; library INFO messages and known-harmless warnings only with -v. The CLI calls
these for its commands; `moeplat repro --jobs N` calls them in each spawned training process,
which inherits neither warning filters nor logger levels."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", message=r".*treespec.*")  # lightning 2.6 on torch 2.13, harmless
    # Lightning's hint on any machine with SLURM's commands (a login node) when a run is not under
    # srun: `moeplat slurm` and the SLURM bridge write the srun line themselves
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")


def quiet_lightning() -> None:
    """Lightning sets its loggers to INFO when imported, so this runs after the import."""
    import lightning  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
