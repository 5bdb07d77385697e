"""`prepare_data.py --executor slurm` on a real one-node SLURM cluster (tests/slurm_cluster.py, the session's one,
shared with test_slurm.py): job arrays that write the local executor's folder byte for byte, and a failed task
rerun alone by the same command.

The command runs as a user runs it, `python scripts/prepare_data.py RECIPE --output DIR --tasks 4 --executor slurm
--slurm_partition tests`, from the repository root, with a PATH that does not hold this Python's scripts folder (a
user who calls .venv/bin/python without activating it): the tasks must still find datatrove's
`launch_pickled_pipeline` (data/slurm_executor.py). The script submits and returns; the test waits until squeue
holds none of the preparation's jobs (the arrays, the stages waiting on them, datatrove's merge_stats jobs),
polling every 0.2 s. The same command once the arrays are gone submits nothing and writes the manifest's counts.
"""

import filecmp
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import slurm_cluster
from conftest import load_script, prepare_recipe, random_repositories, write_repository_shards

from starcoder2_train.data.store.prepared import held_out_part_path

ROOT = Path(__file__).parents[1]
pytestmark = [
    pytest.mark.skipif(slurm_cluster.skip_reason() is not None, reason=str(slurm_cluster.skip_reason())),
    pytest.mark.slow,  # SLURM jobs, each task a Python that imports the data libraries (~5 s of CPU each)
]
prepare_data = load_script("prepare_data")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_repository_shards(tmp_path_factory.mktemp("slurm-prepare") / "shards", random_repositories(40, 9), 4)


@pytest.fixture
def user_env(slurm_env):
    """The cluster's environment with this Python's scripts folder taken off PATH (a venv not activated)."""
    scripts = sysconfig.get_path("scripts")
    path = os.pathsep.join(entry for entry in slurm_env["PATH"].split(os.pathsep) if entry != scripts)
    return {**slurm_env, "PATH": path}


recipe = prepare_recipe


def run_prepare(env: dict, *arguments: str) -> subprocess.CompletedProcess:
    """The documented command with `--executor slurm --slurm_partition tests`, from the repository root."""
    command = [sys.executable, "scripts/prepare_data.py", *arguments, "--executor", "slurm"]
    command += ["--slurm_partition", "tests", "--disable_tqdm"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def prepare_on_slurm(env: dict, *arguments: str) -> str:
    """run_prepare, which must succeed; its stdout (datatrove's log, on stderr, is in the failure message)."""
    result = run_prepare(env, *arguments)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def pending_arrays(env: dict) -> list[str]:
    result = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%F"], env=env, capture_output=True, text=True)
    return sorted(set(result.stdout.split()))


def wait_for_jobs(env: dict, output: Path, timeout: float = 300) -> None:
    """Until squeue holds no prepare_data job: the arrays ended, and the jobs waiting on a failed one were
    cancelled (a job pending on a dependency never satisfied fails this wait), naming the SLURM logs otherwise."""

    def queued():
        result = subprocess.run(["squeue", "-h", "-o", "%i %j %T %r"], env=env, capture_output=True, text=True)
        return [line for line in result.stdout.splitlines() if " prepare_data-" in line]

    try:
        slurm_cluster.wait_for(lambda: not queued(), timeout, "the preparation's jobs to leave squeue", interval=0.2)
    except TimeoutError as error:
        logs = sorted(output.rglob("slurm_logs/*.out"))
        tails = "\n".join(f"--- {log}\n{log.read_text()[-1500:]}" for log in logs[-4:])
        raise TimeoutError(f"{error}: {queued()}\n{tails}") from None


def prepared_files(folder: Path) -> list[str]:
    """Every file of a prepared folder but datatrove's logging dirs (logs*/: logs, timings, the executor's options
    and SLURM's logs, which differ by nature)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith("logs")]
        found += [os.path.relpath(os.path.join(root, name), folder) for name in files]
    return sorted(found)


def assert_same_files(local: Path, slurm: Path) -> None:
    """Token stores, offsets, held-out parquet, the manifest and the reports, byte for byte."""
    files = prepared_files(local)
    assert files == prepared_files(slurm)
    assert "manifest.json" in files and any(name.endswith(".parquet") for name in files)
    assert any(name.endswith(".tokens") for name in files) and any(name.endswith(".offsets") for name in files)
    assert [name for name in files if not filecmp.cmp(local / name, slurm / name, shallow=False)] == []


def test_slurm_arrays_write_the_local_executors_folder_byte_for_byte(shards, tokenizer_dir, tmp_path, user_env):
    """Four stages chained on SLURM (three near-dedup runs of 2, 2 and 1 tasks, then the tokens of 2 epochs with
    file-level FIM in 2 tasks), each array waiting for the one before; the same command while they are queued is
    refused (it would submit their tasks twice)."""
    keys = dict(fim_level="file", near_dedup=True, near_dedup_buckets=2)
    path, local, slurm = recipe(tmp_path, shards, tokenizer_dir, **keys), tmp_path / "local", tmp_path / "slurm"
    common = [path, "--tasks", "2", "--epochs", "2"]
    prepare_data.main([*common, "--output", str(local), "--disable_tqdm"])
    assert "submitted" in prepare_on_slurm(user_env, *common, "--output", str(slurm))
    # The same command while the arrays are queued (held there, so the test does not race them) is refused.
    held = pending_arrays(user_env)
    assert held  # the tokens stage waits for the three near-dedup stages
    # (scontrol exits 1 naming the array tasks already running or done, which it cannot hold: they are left be)
    subprocess.run(["scontrol", "hold", ",".join(held)], env=user_env, capture_output=True, timeout=30)
    refused = run_prepare(user_env, *common, "--output", str(slurm))
    subprocess.run(["scontrol", "release", ",".join(held)], env=user_env, capture_output=True, timeout=30)
    assert refused.returncode == 1 and "of an earlier submission are still queued or running" in refused.stderr
    assert "Traceback" not in refused.stderr
    wait_for_jobs(user_env, slurm)
    assert sorted(os.listdir(slurm / "logs" / "completions")) == ["00000", "00001"]
    assert "every task is complete: nothing submitted" in prepare_on_slurm(user_env, *common, "--output", str(slurm))
    assert_same_files(local, slurm)


def test_a_failed_slurm_task_is_rerun_alone_by_the_same_command(shards, tokenizer_dir, tmp_path, user_env):
    """Task 2 of 4 cannot write its held-out parquet (a folder where the file goes): its array task fails, the
    merge_stats job waiting on the array is cancelled, not left pending; with the folder gone the same command
    submits an array of task 2 alone, and the folder is the one the local executor writes."""
    path, local, slurm = recipe(tmp_path, shards, tokenizer_dir, fim_level="window"), tmp_path / "l", tmp_path / "s"
    common = [path, "--tasks", "4"]
    prepare_data.main([*common, "--output", str(local), "--disable_tqdm"])
    blocked = Path(f"{held_out_part_path(str(slurm), 2, 4)}.partial")
    blocked.mkdir(parents=True)
    prepare_on_slurm(user_env, *common, "--output", str(slurm))
    wait_for_jobs(user_env, slurm)
    logs = slurm / "logs"
    assert sorted(os.listdir(logs / "completions")) == ["00000", "00001", "00003"]
    first_logs = sorted(os.listdir(logs / "slurm_logs"))
    failed = next(name for name in first_logs if name.endswith("_2.out"))
    assert "IsADirectoryError" in (logs / "slurm_logs" / failed).read_text()

    blocked.rmdir()
    prepare_on_slurm(user_env, *common, "--output", str(slurm))
    assert json.loads((logs / "ranks_to_run.json").read_text()) == [2]  # datatrove's completions: task 2 alone
    assert "#SBATCH --array=0-0\n" in (logs / "launch_script.slurm").read_text()
    wait_for_jobs(user_env, slurm)
    assert sorted(os.listdir(logs / "completions")) == ["00000", "00001", "00002", "00003"]
    rerun = sorted(set(os.listdir(logs / "slurm_logs")) - set(first_logs))
    assert len([name for name in rerun if name.endswith("_0.out")]) == 2  # the array of one task, its merge_stats
    assert "every task is complete: nothing submitted" in prepare_on_slurm(user_env, *common, "--output", str(slurm))
    assert_same_files(local, slurm)
