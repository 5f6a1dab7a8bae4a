"""A real single-node Slurm for the tests: munged, slurmctld and slurmd as this session's processes, in a temp dir.

This machine is the controller and its only compute node (CPU only, its real CPU count and memory); everything
Slurm keeps (configuration, munge key, spool, state, logs) lies in the folder given, and the daemons are stopped by
their PIDs afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
PACKAGES = ("slurm-wlm", "munge")
READY_TIMEOUT_S = 60.0
IDLE_PARTITION = "debug"


class SlurmSetupError(Exception):
    """The test Slurm cannot be brought up; the message says what is missing."""


def ensure_installed() -> None:
    """Slurm's daemons and commands: installed with apt-get when missing (as root), else SlurmSetupError."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmSetupError(
            f"Slurm is not installed ({', '.join(missing)} missing) and these tests are not root: "
            f"apt-get install {' '.join(PACKAGES)} (CI's .ci/run does)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SlurmSetupError(f"{' '.join(argv)} failed: {proc.stderr[-2000:]}")
    still = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if still:
        raise SlurmSetupError(f"after apt-get install {' '.join(PACKAGES)}, still missing: {', '.join(still)}")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


@dataclass
class SlurmCluster:
    """A running single-node Slurm; `conf` is its slurm.conf (SLURM_CONF for its commands)."""

    root: Path
    conf: Path
    node: str
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A Slurm command against this cluster."""
        return subprocess.run(
            list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def jobs(self) -> list[str]:
        """`squeue`'s job ids (every state it lists: pending, running, completing)."""
        out = self.run("squeue", "--noheader", "--format=%i")
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    def job_field(self, job_id: str, key: str) -> str:
        out = self.run("scontrol", "show", "job", "--oneliner", job_id)
        assert out.returncode == 0, out.stderr
        for token in out.stdout.split():
            name, _, value = token.partition("=")
            if name == key:
                return value
        raise AssertionError(f"scontrol show job {job_id} has no {key}: {out.stdout}")

    def wait_no_jobs(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (left := self.jobs()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Slurm jobs left: {left}"

    def log_tail(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """slurmd, slurmctld, then munged: SIGTERM by PID, SIGKILL after a grace."""
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmSetupError("/proc/meminfo has no MemTotal")


def slurm_conf(root: Path, node: str, cpus: int, memory_mib: int, munge_socket: Path) -> str:
    """slurm.conf for one CPU-only node that is also the controller; no cgroups, no accounting."""
    ctld_port, slurmd_port = _free_port(), _free_port()
    return "\n".join(
        [
            "ClusterName=fedlearn-test",
            f"SlurmctldHost={node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SlurmdParameters=config_overrides",
            "MessageTimeout=5",
            "KillWait=3",
            "MinJobAge=600",
            "InactiveLimit=0",
            "Waittime=0",
            f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mib} State=UNKNOWN",
            f"PartitionName={IDLE_PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def start_cluster(root: Path, env: dict[str, str]) -> SlurmCluster:
    """munged, slurmctld and slurmd with everything under root; returns once the node is idle."""
    ensure_installed()
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    sock_dir = root / "munge-socket"
    sock_dir.mkdir(exist_ok=True)
    os.chmod(sock_dir, 0o755)  # munged wants its socket's folder open to every client
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    node = socket.gethostname()
    cpus = os.cpu_count() or 1
    munge_socket = sock_dir / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, cpus, max(_memory_mib() - 512, 256), munge_socket))
    cluster = SlurmCluster(root, conf, node, cpus)
    daemon_env = {**env, "SLURM_CONF": str(conf)}
    commands = {
        "munged": [
            _which("munged") or "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={munge_socket}",
            f"--pid-file={root / 'munge' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        ],
        "slurmctld": [_which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(conf)],
        "slurmd": [_which("slurmd") or "slurmd", "-D", "-f", str(conf), "-N", node],
    }
    try:
        for name in DAEMONS:
            out = open(root / "log" / f"{name}.out", "ab")
            cluster.procs[name] = subprocess.Popen(
                commands[name], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=daemon_env
            )
            out.close()
            if name == "munged":
                _wait_for(lambda: munge_socket.exists(), cluster, "munged's socket")
            if name == "slurmctld":
                _wait_for(lambda: cluster.run("scontrol", "ping").returncode == 0, cluster, "slurmctld")
        _wait_for(lambda: _node_state(cluster) == "idle", cluster, f"node {node} idle")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_state(cluster: SlurmCluster) -> str:
    out = cluster.run("sinfo", "--noheader", "--Node", "--format=%T", "--partition", IDLE_PARTITION)
    return out.stdout.strip()


def _wait_for(ready, cluster: SlurmCluster, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            outs = "\n".join(
                (cluster.root / "log" / f"{n}.out").read_text(errors="replace")[-2000:] for n in cluster.procs
            )
            raise SlurmSetupError(
                f"the test Slurm did not come up ({what}; exited: {dead or 'none'}):\n{outs}\n{cluster.log_tail()}"
            )
        time.sleep(0.2)
