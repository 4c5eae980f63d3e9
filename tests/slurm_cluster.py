"""A throwaway one-node SLURM cluster for tests of the SLURM bridge (moeplat.server.slurm_worker).

`slurm_cluster` (session scope) mirrors tests/postgres.py: in a temporary directory it writes a
munge key and a slurm.conf for one node (this host, its CPUs, no cgroups, no accounting database),
starts munged, slurmctld and slurmd in the foreground as children of the test, waits until `sinfo`
shows the node idle, points $SLURM_CONF at it for the code under test, and at the end stops the
three daemons and removes the directory. Debian's `slurm-wlm` and `munge` packages provide the
binaries (`scripts/system-deps.sh`). The daemons run as root (SlurmUser=root): the tests run as
root in CI and in the dev container; as another user the tests are skipped.

Without the binaries the tests are skipped, naming what to install, except with
MOEPLAT_REQUIRE_SLURM=1 (CI): then they fail. No slurmdbd: `sacct` answers "accounting storage
is disabled", which is the case the bridge's `scontrol show job` fallback is for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = "run scripts/system-deps.sh (as root; `make system-deps`) to install slurm-wlm and munge"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
PARTITION = "debug"
SHORT = "short"  # MaxTime=1 minute: a job asking for more pends with reason PartitionTimeLimit


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).is_file()), None
    )


def unavailable() -> str | None:
    """Why a SLURM cluster cannot be started here, or None."""
    missing = [b for b in BINARIES if _find(b) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs its daemons as root (SlurmUser=root); not root here"
    return None


def skip_or_fail() -> None:
    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("MOEPLAT_REQUIRE_SLURM") == "1":
        pytest.fail(f"MOEPLAT_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONF = """\
ClusterName=moeplattest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/slurmd
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
SchedulerParameters=sched_interval=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1024 State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName={short} Nodes={host} Default=NO MaxTime=1 State=UP OverSubscribe=NO
"""


@dataclass
class Cluster:
    """munged + slurmctld + slurmd in one temporary directory, owned by the test session."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="moeplat-slurm-")))
    procs: list[subprocess.Popen] = field(default_factory=list)
    cpus: int = 2

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write(self) -> None:
        os.chmod(self.root, 0o755)  # munged refuses a world-writable place; slurmd reads it as root
        for d in ("ctld", "slurmd", "munge"):
            (self.root / d).mkdir(mode=0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(
            CONF.format(
                host=socket.gethostname().split(".")[0],
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=self.root / "munge" / "munge.socket",
                root=self.root,
                cpus=self.cpus,
                partition=PARTITION,
                short=SHORT,
            )
        )

    def _start(self, *cmd: str, log: str) -> None:
        out = open(self.root / log, "ab")  # noqa: SIM115 - kept open for the daemon's lifetime
        self.procs.append(
            subprocess.Popen(
                list(cmd), env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def start(self) -> None:
        m = self.root / "munge"
        self._start(
            _find("munged") or "munged",
            "--foreground",
            "--force",
            f"--socket={m / 'munge.socket'}",
            f"--key-file={m / 'munge.key'}",
            f"--pid-file={m / 'munged.pid'}",
            f"--seed-file={m / 'munged.seed'}",
            f"--log-file={m / 'munged.log'}",
            log="munged.out",
        )
        self._wait(lambda: (m / "munge.socket").exists(), "munged", "munge/munged.log")
        self._start(_find("slurmctld") or "slurmctld", "-D", "-i", log="slurmctld.out")
        self._wait(lambda: self.sinfo("%P") != "", "slurmctld", "slurmctld.log")
        self._start(_find("slurmd") or "slurmd", "-D", log="slurmd.out")
        self._wait(lambda: self.sinfo("%t") == "idle", "slurmd (node idle)", "slurmd.log")

    def sinfo(self, fmt: str) -> str:
        out = subprocess.run(
            ["sinfo", "-h", "-o", fmt], env=self.env, capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    def _wait(self, ready, what: str, log: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        text = (self.root / log).read_text(errors="replace")[-3000:] if (self.root / log).exists() else ""
        self.stop()
        pytest.fail(f"{what} did not come up:\n{text}")

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd, slurmctld, munged: our own children, by pid
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """A running one-node SLURM cluster; $SLURM_CONF names it while the session lasts."""
    skip_or_fail()
    cluster = Cluster()
    saved = os.environ.get("SLURM_CONF")
    try:
        cluster.write()
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        cluster.stop()
