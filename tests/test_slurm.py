"""README's sbatch command on a real one-node SLURM cluster (tests/slurm_cluster.py): preempted, requeued, resumed,
then a node lost and the run resumed on fewer processes.

The job is scripts/slurm/train.sbatch as README gives it, with the options a CPU-only one-node cluster needs on the
command line (`--nodes 1 --gpus-per-node 0 --cpus-per-task N`) and GPUS_PER_NODE=2 (two CPU processes under
DeepSpeed ZeRO-2). Mid-run the test sends SIGUSR1 to the job's steps (`scancel --signal USR1`, what
`--signal=USR1@120` does before the time limit); the ranks save a complete checkpoint, the script requeues the job,
the test moves the requeued job's start time to 2 s from now (SLURM holds a requeued job for 120 s: a launch in the
second of its credential's revocation fails), and the job resumes.
Mid-way through that second start the job is stopped again and cancelled, as when a node is lost for good, and the
run goes on as a new job with GPUS_PER_NODE=1 and twice the accumulation: DeepSpeed's universal checkpoint converts
the 2-process state, and the run finishes with the losses of the run never stopped.
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
STEPS = 100
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
def test_readme_sbatch_command_is_preempted_requeued_resumed_and_survives_a_lost_node(
    cluster,
    setup,  # noqa: F811
    tmp_path,
):
    root, recipe, driver = setup
    # 100 steps (~0.1 s each here): each signal, sent once 3 steps of the current start are in the log, lands well
    # before the end.
    steps = ["--max_steps", str(STEPS)]
    run(one_process(recipe, driver, tmp_path / "reference") + steps)
    reference_losses = losses(tmp_path / "reference")
    out = tmp_path / "run"
    env = {**LAUNCH_ENV, **cluster, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    two = {**env, "GPUS_PER_NODE": "2"}
    job = submit(two, recipe, "--per_device_train_batch_size", "2", "--output_dir", str(out), *steps)
    log = ROOT / "logs" / f"starcoder2-train-{job}.out"
    history = []  # each change of (JobState, Restarts, ExitCode, Reason) seen, for the failure message
    jobs = [job]
    try:
        # 1. Step 3 is logged: signal the job's steps as SLURM does before the time limit; the job saves and
        # requeues itself; the test lets it start again at once.
        preempt(env, job, log, "restart 0", restarts=1, history=history)
        # SLURM holds a requeued job for cred_expire (120 s by default): slurmd revoked the job's credential when
        # it was requeued, and refuses a launch whose credential bears the same second as the revocation ("Job
        # credential revoked", the job then FAILED with NonZeroExitCode). The test shortens the hold to 2 s.
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], env=env, check=True, timeout=30)
        # 2. The requeued job resumes on 2 processes; 3 steps later a node is lost: the job is stopped the same
        # way, then cancelled, and the run goes on as a new job on 1 process with twice the accumulation (the same
        # global batch), which converts the 2-process ZeRO-2 checkpoint through DeepSpeed's universal checkpoint.
        preempt(env, job, log, f"job {job} restart 1", restarts=2, history=history)
        subprocess.run(["scancel", job], env=env, check=True, timeout=30)
        watch(env, job, lambda fields: fields.get("JobState") in ENDED, 60, history, log)
        slurm_cluster.wait_for(lambda: slurm_cluster.node_state(env) == "idle", 120, "the node's cleanup of the job")
        first_output = log.read_text()
        one = {**env, "GPUS_PER_NODE": "1"}
        overrides = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
        jobs.append(submit(one, recipe, *overrides, "--output_dir", str(out), *steps))
        log_after = ROOT / "logs" / f"starcoder2-train-{jobs[1]}.out"
        watch(env, jobs[1], lambda fields: fields.get("JobState") in ENDED, 300, history, log_after)
        output = log_after.read_text()
        fields = slurm_cluster.job_fields(env, jobs[1])
        assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", diagnosis(env, history, output)
        for text in (first_output, output):
            assert "ChildFailedError" not in text and "Traceback" not in text, text[-5000:]
        assert first_output.count("stopped for a restart from a complete checkpoint") == 2, first_output[-5000:]
        saved = [
            json.loads(part.split(")")[0])["step"]
            for part in first_output.split("stopped for a restart from a complete checkpoint (")[1:]
        ]
        assert 3 <= saved[0] < saved[1] < STEPS, saved
        assert "1 nodes, 1 processes" in output and f"checkpoint-{saved[1]}" in output, output[-5000:]
        assert "was written by 2 processes, this run has 1" in output, output[-5000:]
        assert losses(out) == pytest.approx(reference_losses, rel=1e-5) and len(reference_losses) == STEPS
        assert (out / "model.safetensors").exists()
    finally:
        for each in jobs:
            subprocess.run(["scancel", each], env=env, timeout=30)
            each_log = ROOT / "logs" / f"starcoder2-train-{each}.out"
            if each_log.exists():  # kept beside the test's files, out of the repository's logs/
                each_log.replace(tmp_path / each_log.name)


def preempt(env: dict, job: str, log: Path, start: str, restarts: int, history: list) -> None:
    """Once 3 steps of the job's start marked `start` (its 'job N restart K' line) are in its log, send SIGUSR1 to
    the job's steps (what `--signal=USR1@120` does before the time limit) and wait until the job has saved and
    requeued itself (PENDING, `restarts` restarts) and the node has finished the cleanup of its run (state
    `completing`: a start before that can fail)."""

    def three_steps(fields):
        text = log.read_text() if log.exists() else ""
        return start in text and text.split(start, 1)[1].count("'loss'") >= 3

    watch(env, job, three_steps, 240, history, log)
    subprocess.run(["scancel", "--signal", "USR1", job], env=env, check=True, timeout=30)
    requeued = lambda fields: fields.get("JobState") == "PENDING" and int(fields.get("Restarts", 0)) >= restarts  # noqa: E731
    watch(env, job, requeued, 120, history, log)
    slurm_cluster.wait_for(lambda: slurm_cluster.node_state(env) == "idle", 120, "the node's cleanup of the job")
