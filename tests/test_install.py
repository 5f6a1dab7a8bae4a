"""What a plain install gives: the console alone, without numpy or torch; the roles' extras; one version."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import ROOT, python_env

# Run the console in an interpreter where numpy, torch and the other heavy packages cannot be imported at all.
_BLOCKED_RUN = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"numpy", "torch", "ml_dtypes", "sklearn", "matplotlib"}:
            raise ImportError(f"{name} is not installed (blocked by the test)")
sys.meta_path.insert(0, Blocked())
from fedadmin.cli import main
main(sys.argv[1:], prog_name="fedadmin")
"""


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, *args],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=ROOT,
        timeout=60,
    )


def test_the_console_runs_without_numpy_or_torch():
    """Issue 19 item 9: the console needs neither torch nor numpy."""
    version = _console("--version")
    assert version.returncode == 0 and version.stdout.strip() == "fedadmin 0.1.0", version.stderr
    helped = _console("--help")
    assert helped.returncode == 0 and "deploy" in helped.stdout and "status" in helped.stdout, helped.stderr
    for command in ("status", "deploy", "logs", "metrics", "validate", "poc", "provision"):
        done = _console(command, "--help")
        assert done.returncode == 0, (command, done.stderr)


def test_a_plain_install_is_the_console_and_the_roles_come_with_their_extras():
    """Issue 19 item 9: torch was an exact pin in the core dependencies, so the console alone pulled torch."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for heavy in ("torch", "numpy", "ml_dtypes", "scikit-learn"):
        assert heavy not in core
    extras = project["optional-dependencies"]
    assert any(d.startswith("numpy") for d in extras["server"])
    assert any(d.startswith("torch>=") for d in extras["site"])
    assert any(d.startswith("scikit-learn") for d in extras["examples"])
    pinned = [d for ds in [project["dependencies"], *extras.values()] for d in ds if "==" in d]
    assert pinned == [], "exact pins belong in the Makefile"


def test_every_role_says_its_version():
    """Issue 19 item 8: `--version` on all three commands, from the one version of the distribution."""
    from fedcommon import __version__

    for role in ("fedadmin.cli", "fedserver.cli", "fedclient.cli"):
        done = subprocess.run(
            [sys.executable, "-m", role, "--version"],
            capture_output=True,
            text=True,
            env=python_env(),
            cwd=ROOT,
            timeout=60,
        )
        assert done.returncode == 0 and done.stdout.split() == [role.split(".")[0], __version__], done.stderr


def test_a_poc_without_the_roles_extras_says_what_to_install(tmp_path):
    """Issue 19 item 9: where a plain install would miss an extra, the message names it."""
    from conftest import prepare_workspace

    ws = prepare_workspace(tmp_path / "ws", clients=1)
    done = _console("poc", "start", "--workspace", str(ws))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pip install 'fedlearn[server,site]'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_an_editable_install_is_a_plain_path_entry_with_no_import_finder(tmp_path):
    """Issue 25: setuptools' import finder for an editable install cost every Python start ~11 ms (a one-shot
    `fedadmin status` included); with the packages' folder said to be the root, the install is one .pth line."""
    project = tmp_path / "project"  # a copy: an install writes build/ and the egg-info beside pyproject.toml
    for package in ("fedcommon", "fedserver", "fedclient", "fedadmin"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(project)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert not list(site.glob("__editable__*finder*")), sorted(p.name for p in site.iterdir())
    (pth,) = site.glob("__editable__*fedlearn*.pth")
    assert pth.read_text().split() == [str(project.resolve())]
    env = {k: v for k, v in python_env().items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(python), "-c", "import fedcommon, fedadmin; print(fedadmin.__file__)"],  # no dependencies installed
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(project.resolve() / "fedadmin" / "__init__.py")
