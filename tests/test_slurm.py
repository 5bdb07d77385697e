"""README's sbatch command on a real one-node SLURM cluster (tests/slurm_cluster.py): preempted, requeued, resumed.

The job is scripts/slurm/train.sbatch as README gives it, with the options a CPU-only one-node cluster needs on the
command line (`--nodes 1 --gpus-per-node 0 --cpus-per-task N`) and GPUS_PER_NODE=2 (two CPU processes under
DeepSpeed ZeRO-2). Mid-run the test sends SIGUSR1 to the job's steps (`scancel --signal USR1`, what
`--signal=USR1@120` does before the time limit); the ranks save a complete checkpoint, the script requeues the job,
the test moves the requeued job's start time to now (SLURM holds a requeued job for a while), and the job resumes
and finishes with the losses of the run never stopped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_cluster
from conftest import LAUNCH_ENV
from test_preemption import losses, one_process, run, setup  # noqa: F401 (setup: the module fixture of the recipe)

ROOT = Path(__file__).parents[1]
STEPS = 60
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
pytestmark = pytest.mark.skipif(slurm_cluster.skip_reason() is not None, reason=str(slurm_cluster.skip_reason()))


@pytest.fixture
def cluster(slurm_env):  # the session's one cluster (conftest.py), shared with test_prepare_slurm.py
    return slurm_env


def submit(env: dict, recipe: Path, *overrides: str) -> str:
    """README's command (`sbatch --nodes N scripts/slurm/train.sbatch RECIPE [--key value ...]`), from the
    repository root, with what a CPU-only node needs; the job id."""
    command = ["sbatch", "--parsable", "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", str(os.cpu_count())]
    command += ["scripts/slurm/train.sbatch", str(recipe), *overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def watch(env: dict, job: str, until, timeout: float, history: list, log: Path) -> dict:
    """Poll the job until `until(fields)`, recording each change of its state in `history`; TimeoutError with the
    history, the job's log and the controller's log otherwise."""

    def reached():
        fields = slurm_cluster.job_fields(env, job)
        seen = tuple(fields.get(key) for key in ("JobState", "Restarts", "ExitCode", "Reason"))
        if not history or history[-1] != seen:
            history.append(seen)
        return fields if until(fields) else None

    try:
        return slurm_cluster.wait_for(reached, timeout, f"job {job}", interval=0.2)
    except TimeoutError as error:
        job_log = log.read_text() if log.exists() else "(no log)"
        raise TimeoutError(f"{error}\n{diagnosis(env, history, job_log)}") from None


def diagnosis(env: dict, history: list, output: str) -> str:
    """The job's states in order, the end of its log and of both daemons' logs: what a failure message needs."""
    folder = Path(env["SLURM_CONF"]).parent
    daemons = {name: (folder / name).read_text()[-2500:] for name in ("slurmctld.log", "slurmd.log")}
    parts = [f"states: {history}", f"--- job log\n{output[-4000:]}"]
    return "\n".join(parts + [f"--- {name}\n{text}" for name, text in daemons.items()])


@pytest.mark.slow
def test_readme_sbatch_command_is_preempted_requeued_and_resumes_like_the_run_left_alone(
    cluster,
    setup,  # noqa: F811
    tmp_path,
):
    root, recipe, driver = setup
    # 60 steps (~0.1 s each here): the signal, sent once step 3 is in the log, lands well before the end.
    steps = ["--max_steps", str(STEPS)]
    run(one_process(recipe, driver, tmp_path / "reference") + steps)
    reference_losses = losses(tmp_path / "reference")
    out = tmp_path / "run"
    env = {
        **LAUNCH_ENV,
        **cluster,
        "GPUS_PER_NODE": "2",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    job = submit(env, recipe, "--per_device_train_batch_size", "2", "--output_dir", str(out), *steps)
    log = ROOT / "logs" / f"starcoder2-train-{job}.out"
    try:
        # Step 3 is logged: signal the job's steps as SLURM does before the time limit.
        slurm_cluster.wait_for(lambda: log.exists() and log.read_text().count("'loss'") >= 3, 240, f"step 3 in {log}")
        subprocess.run(["scancel", "--signal", "USR1", job], env=env, check=True, timeout=30)
        history = []  # each change of (JobState, Restarts, ExitCode, Reason) seen, for the failure message
        pending = lambda fields: fields.get("JobState") == "PENDING" and int(fields.get("Restarts", 0)) >= 1  # noqa: E731
        watch(env, job, pending, 120, history, log)
        # SLURM holds a requeued job before it may start again; the test does not wait for that, only for the node
        # to finish the cleanup of the job's first run (state `completing`): a start before that can fail.
        slurm_cluster.wait_for(lambda: slurm_cluster.node_state(env) == "idle", 120, "the node's cleanup of the job")
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True, timeout=30)
        watch(env, job, lambda fields: fields.get("JobState") in ENDED, 300, history, log)
        output = log.read_text()
        fields = slurm_cluster.job_fields(env, job)
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", diagnosis(env, history, output)
        assert "stopped for a restart from a complete checkpoint" in output and "requeueing" in output, output[-5000:]
        assert "ChildFailedError" not in output and "Traceback" not in output, output[-5000:]
        assert "job " + job + " restart 1" in output and "resuming from" in output, output[-5000:]
        checkpoint_step = json.loads(
            output.split("stopped for a restart from a complete checkpoint (")[1].split(")")[0]
        )["step"]
        assert 3 <= checkpoint_step < STEPS
        assert losses(out) == pytest.approx(reference_losses, rel=1e-5) and len(reference_losses) == STEPS
        assert (out / "model.safetensors").exists()
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)
        if log.exists():  # kept beside the test's files, out of the repository's logs/
            log.replace(tmp_path / log.name)
