"""Where a site's training runs: the launcher its local/launcher.json chooses (DESIGN §14).

`process` (the default): ProcessExecutor, a process group on the agent's host. `slurm`: SlurmExecutor, a job on
the site's cluster.
"""

from __future__ import annotations

from pathlib import Path

from fedclient.client_executor import ClientExecutor, EventHandler, ProcessExecutor
from fedclient.launchers.config import LauncherConfig, LauncherConfigError, load_launcher_config

__all__ = ["LauncherConfig", "LauncherConfigError", "load_launcher_config", "make_executor"]


def make_executor(workspace: Path, on_event: EventHandler | None = None) -> ClientExecutor:
    """The executor of the launcher the site's local/launcher.json chooses; LauncherConfigError if it is unusable."""
    config = load_launcher_config(workspace)
    if config.launcher == "slurm":
        from fedclient.launchers.slurm import SlurmExecutor

        return SlurmExecutor(config.slurm, workspace, on_event)
    return ProcessExecutor(on_event=on_event)
