"""The Slurm launcher on its own: local/launcher.json, what it submits, and its bad inputs against a real Slurm."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pytest
from conftest import copy_mmar, prepare_workspace

from fedclient.admin_interface import ClientAdminInterface, RequestRefused
from fedclient.client_executor import TrainArgs, TrainingError
from fedclient.launchers import LauncherConfigError, load_launcher_config, make_executor
from fedclient.launchers.config import SlurmConfig, parse_launcher_config
from fedclient.launchers.slurm import SlurmExecutor
from fedclient.launchers.slurm_commands import gpu_count, job_state, parse_fields
from fedcommon.commands import ClientStatus


def _site(tmp_path: Path) -> tuple[Path, Path]:
    """A site's workspace with run 1 deployed (a digits copy)."""
    ws = prepare_workspace(tmp_path / "ws", clients=1)
    site = ws / "site-1"
    mmar = copy_mmar(site / "run_1" / "mmar")
    return site, mmar


def _unreachable(conf: str, message_timeout: int) -> str:
    """A slurm.conf naming a controller port nothing listens on; the commands give up after message_timeout."""
    conf = re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=1", conf)
    return re.sub(r"MessageTimeout=\d+", f"MessageTimeout={message_timeout}", conf)


def test_launcher_json_chooses_process_by_default_and_names_what_is_wrong(tmp_path):
    assert load_launcher_config(tmp_path).launcher == "process"
    assert type(make_executor(tmp_path)).__name__ == "ProcessExecutor"
    (tmp_path / "local").mkdir()
    config = {
        "launcher": "slurm",
        "slurm": {
            "partition": "gpu",
            "account": "radiology",
            "qos": "normal",
            "time_limit": "04:00:00",
            "gpus_per_node": 4,
            "nodes": 2,
            "sbatch_options": ["--mem=32G", "--constraint=a100"],
            "shared_folder": "/shared/site-1",
            "pending_limit_s": 600,
        },
    }
    (tmp_path / "local" / "launcher.json").write_text(json.dumps(config))
    loaded = load_launcher_config(tmp_path)
    assert loaded.launcher == "slurm" and loaded.slurm.gpus_per_node == 4
    assert loaded.slurm.sbatch_options == ("--mem=32G", "--constraint=a100")
    assert isinstance(make_executor(tmp_path), SlurmExecutor)
    for bad, named in (
        ({"launcher": "kubernetes"}, "launcher: must be one of process, slurm"),
        ({"launcher": "slurm", "slurm": {"partiton": "gpu"}}, "unknown key(s) partiton"),
        ({"launcher": "slurm", "slurm": {"partition": "gpu; rm -rf /"}}, "slurm.partition: must be a Slurm name"),
        ({"launcher": "slurm", "slurm": {"sbatch_options": ["script.sh"]}}, "slurm.sbatch_options"),
        ({"launcher": "slurm", "slurm": {"sbatch_options": ["--x=a\nb"]}}, "slurm.sbatch_options"),
        ({"launcher": "slurm", "slurm": {"nodes": 0}}, "slurm.nodes: must be a whole number from 1"),
        ({"launcher": "slurm", "slurm": {"time_limit": "soon"}}, "slurm.time_limit"),
        ({"launcher": "slurm", "slurm": {"shared_folder": "relative/path"}}, "must be an absolute path"),
        ({"launcher": "process", "slurm": {"partition": "gpu"}}, 'launcher is "process"'),
    ):
        with pytest.raises(LauncherConfigError) as e:
            parse_launcher_config(bad)
        assert named in str(e.value), (bad, str(e.value))


def test_a_broken_launcher_json_refuses_every_start_naming_the_file_and_key(tmp_path):
    site, _ = _site(tmp_path)
    (site / "local").mkdir(exist_ok=True)
    (site / "local" / "launcher.json").write_text(json.dumps({"launcher": "slurm", "slurm": {"gpus": 4}}))
    interface = ClientAdminInterface(None, "site-1", None, argparse.Namespace(workspace=site), 0)
    try:
        with pytest.raises(RequestRefused) as e:
            interface.start_client(1)
        assert "start refused:" in str(e.value) and "launcher.json: slurm: unknown key(s) gpus" in str(e.value)
        assert interface.client_status()["status"] == "training not started"
    finally:
        interface.close()


def test_the_readmes_cluster_example_is_a_launcher_json_that_loads():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Sites with a cluster", 1)[1]
    example = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    config = parse_launcher_config(example)
    assert config.launcher == "slurm" and config.slurm.partition == "gpu" and config.slurm.nodes == 2


def test_mgpu_asks_whole_gpu_nodes_and_runs_torchrun_rendezvous_on_the_first_node(tmp_path):
    site, mmar = _site(tmp_path)
    config = SlurmConfig(partition="gpu", gpus_per_node=4, nodes=2, shared_folder=Path("/shared/site-1"))
    executor = SlurmExecutor(config, site)
    args = TrainArgs(site, 1)
    options = executor._options(args, site / "run_1", nodes=2, per_node=4, gpus_per_node=4)
    assert {"--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--ntasks-per-node=1"} <= set(options)
    assert "--output=/shared/site-1/run_1/slurm/job-%j.out" in options
    script = executor._script(args, mmar, ranks=8, per_node=4)
    assert "--nproc-per-node 4" in script and '--rdzv-endpoint "$head:$port"' in script
    assert "--workspace /shared/site-1 --mmar /shared/site-1/run_1/mmar" in script
    assert "--events /shared/site-1/run_1/slurm" in script
    with pytest.raises(TrainingError, match="ask for a multiple of 4"):
        executor.start_mgpu_train(None, args, mmar, 6)
    with pytest.raises(TrainingError, match="needs 3 nodes of 4 GPUs"):
        executor.start_mgpu_train(None, args, mmar, 12)


def test_slurm_output_is_parsed_within_bounds():
    fields = parse_fields("JobId=7 JobState=PENDING Reason=Resources ExitCode=0:0 NodeList=(null) " + "X=y " * 2000)
    state = job_state("7", fields)
    assert (state.state, state.reason, state.exit_code, state.final) == ("PENDING", "Resources", 0, False)
    assert job_state("7", parse_fields("JobId=7 JobState=FAILED ExitCode=0:9")).exit_code == -9
    assert job_state("7", parse_fields("JobId=7 JobState=OUT_OF_MEMORY ExitCode=137:0")).final
    with pytest.raises(Exception, match="unexpected JobState"):
        job_state("7", parse_fields("JobId=7 JobState=\x1b[31mRED"))
    assert gpu_count("gpu:4") == 4 and gpu_count("gpu:a100:2(S:0-1),gpu:v100:1") == 3 and gpu_count("(null)") == 0


def test_start_without_slurm_installed_is_refused_at_once_and_status_says_so(tmp_path):
    site, mmar = _site(tmp_path)
    executor = SlurmExecutor(SlurmConfig(bin_dir=tmp_path / "no-slurm"), site)
    started = time.monotonic()
    with pytest.raises(TrainingError) as e:
        executor.start_train(None, TrainArgs(site, 1), mmar)
    assert time.monotonic() - started < 5
    assert "Slurm is not installed here" in str(e.value) and "sbatch" in str(e.value)
    assert executor.status == ClientStatus.TRAINING_EXCEPTION and "not installed" in executor.error
    assert "error" in executor.cluster_info()
    no_conf = SlurmExecutor(SlurmConfig(slurm_conf=tmp_path / "missing.conf"), site)
    with pytest.raises(TrainingError, match="missing.conf .local/launcher.json slurm.slurm_conf. is not a file"):
        no_conf.start_train(None, TrainArgs(site, 1), mmar)


@pytest.mark.slow
def test_unreachable_controller_and_refused_options_are_reported_in_slurms_words(tmp_path, slurm_cluster):
    site, mmar = _site(tmp_path)
    dead = tmp_path / "dead.conf"
    dead.write_text(_unreachable(slurm_cluster.conf.read_text(), 2))
    executor = SlurmExecutor(SlurmConfig(slurm_conf=dead), site)
    started = time.monotonic()
    with pytest.raises(TrainingError) as e:
        executor.start_train(None, TrainArgs(site, 1), mmar)
    assert time.monotonic() - started < 30
    assert "cannot submit to Slurm" in str(e.value) and "controller does not answer" in str(e.value)
    assert executor.status == ClientStatus.TRAINING_EXCEPTION

    refusing = SlurmExecutor(SlurmConfig(slurm_conf=slurm_cluster.conf, partition="nosuchpartition"), site)
    with pytest.raises(TrainingError) as e:
        refusing.start_train(None, TrainArgs(site, 1), mmar)
    assert "Slurm refused the job" in str(e.value) and "invalid partition" in str(e.value).lower()
    assert slurm_cluster.jobs() == []


@pytest.mark.slow
def test_a_failing_scancel_is_retried_and_reported_then_abort_leaves_no_job(tmp_path, slurm_cluster):
    site, mmar = _site(tmp_path)
    conf = tmp_path / "slurm.conf"  # the site's own copy: made unreachable for a while below
    good = slurm_cluster.conf.read_text()
    conf.write_text(good)
    executor = SlurmExecutor(SlurmConfig(slurm_conf=conf, poll_s=0.5), site)
    job = str(executor.start_train(None, TrainArgs(site, 1), mmar))
    try:
        deadline = time.monotonic() + 30
        while executor.status != ClientStatus.TRAINING_STARTED and time.monotonic() < deadline:
            time.sleep(0.2)
        assert executor.status == ClientStatus.TRAINING_STARTED, executor.status_detail()
        assert slurm_cluster.job_field(job, "JobState") == "RUNNING"
        conf.write_text(_unreachable(good, 1))
        with pytest.raises(TrainingError) as e:
            executor.abort_train(None)
        assert f"scancel of Slurm job {job} failed 3 times" in str(e.value) and "controller" in str(e.value)
        assert executor.status_detail()["cancel_error"] == str(e.value)
        deadline = time.monotonic() + 15  # the follower's own polls fail too, and the status says so
        while not executor.status_detail()["detail"].startswith(f"cannot ask Slurm about job {job}: "):
            assert time.monotonic() < deadline, executor.status_detail()
            time.sleep(0.2)
        assert executor.status == ClientStatus.TRAINING_STARTED
        assert slurm_cluster.job_field(job, "JobState") == "RUNNING"  # reported as failed: it was
        conf.write_text(good)
        executor.abort_train(None)
        assert executor.status == ClientStatus.TRAINING_STOPPED
        assert slurm_cluster.job_field(job, "JobState") == "CANCELLED"
        slurm_cluster.wait_no_jobs(30)
    finally:
        conf.write_text(good)
        slurm_cluster.run("scancel", job)
