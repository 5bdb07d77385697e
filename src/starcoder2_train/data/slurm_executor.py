"""`prepare_data.py --executor slurm`: datatrove's SlurmPipelineExecutor, with what it leaves to its caller done here.

What datatrove's executor does (datatrove 0.10.1, datatrove/executor/slurm.py, read from the installed source; run
on a real one-node SLURM 22.05 cluster in tests/test_prepare_slurm.py): it pickles itself (dill) into
`logging_dir/executor.pik`, lists the ranks without a completion in `ranks_to_run.json`, writes
`logging_dir/launch_script.slurm` (`#SBATCH --array=0-<n-1>`, the partition, time, CPUs and memory per task, then
the environment command, then `srun -l -n 1 launch_pickled_pipeline <executor.pik>`) and submits it with `sbatch`;
array index i runs rank ranks_to_run[i], so the same command again submits only the tasks that failed or never
ran. Each task's SLURM log is `logging_dir/slurm_logs/<job>_<index>.out`, its datatrove log
`logging_dir/logs/task_<rank>.log`. A stage given `depends` is submitted with `--dependency=afterok:<job>` on the
stage before it (none when that stage had nothing left to run), and each stage also submits a one-task
`merge_stats` job, afterok on its array.

What it leaves to the caller, done by `slurm_options`:
- the environment of the tasks. datatrove writes `source <venv_path>` (the activation script, not the folder) or
  nothing. Found on the cluster: with nothing, `launch_pickled_pipeline` is not on the task's PATH unless the
  submitting shell had the environment activated (every task: `execve(): launch_pickled_pipeline: No such file`);
  with README's `--slurm_venv_path .venv`, `source: .venv: is a directory`, then the same. Here a venv folder or
  its activation script is accepted (made absolute, checked to exist), and without one the tasks put this
  interpreter's scripts folder (where `launch_pickled_pipeline` is installed) first on PATH. The cluster's nodes
  must see that path (a shared filesystem), as they must see the data and DIR.
- the partition: datatrove writes `#SBATCH --partition=<value>` always, so none given would submit
  `--partition=None`; refused here first.
- a failed stage. By default SLURM keeps a job whose `afterok` can never be met pending forever
  (DependencyNeverSatisfied): the next stage's array and the merge_stats job would sit in the queue. Every job is
  submitted with `--kill-on-invalid-dep=yes`, so SLURM cancels them; the same command again resubmits them.
- squeue's or sbatch's failure (no SLURM here, an unknown partition): one line naming what to do, not a traceback.
The tasks themselves are the pipeline objects the local executor runs, so they write the same bytes.
- the same command while the arrays are still queued or running: datatrove knows only completions, so it would
  submit the unfinished tasks a second time (two copies writing the same parts). Refused here, naming the jobs
  squeue lists with a log under DIR (datatrove writes every stage's SLURM logs in its logging dir, inside DIR).
"""

import os
import subprocess
import sysconfig

from starcoder2_train.configs import RecipeError


def task_environment(venv_path: str | None) -> str:
    """The shell line each task runs before `launch_pickled_pipeline`: activate `venv_path` (a venv folder, or its
    bin/activate), else put this interpreter's scripts folder first on PATH."""
    if venv_path is None:
        return f'export PATH="{sysconfig.get_path("scripts")}:$PATH"'
    script = os.path.abspath(venv_path)
    if os.path.isdir(script):
        script = os.path.join(script, "bin", "activate")
    if not os.path.isfile(script):
        raise RecipeError(
            f"--slurm_venv_path {venv_path}: no {script}; give the virtual environment's folder (the one holding "
            "bin/activate) or its activation script, or leave it out to use this Python's environment."
        )
    return f'source "{script}"'


def slurm_options(
    partition: str | None, time: str, cpus_per_task: int, mem_per_cpu_gb: int, venv_path: str | None
) -> dict:
    """SlurmPipelineExecutor's keyword arguments for prepare_data.py's --slurm_* options (module docstring)."""
    if not partition:
        raise RecipeError("--slurm_partition: required with --executor slurm (sinfo lists the partitions).")
    return {
        "partition": partition,
        "time": time,
        "cpus_per_task": cpus_per_task,
        "mem_per_cpu_gb": mem_per_cpu_gb,
        "env_command": task_environment(venv_path),
        "sbatch_args": {"kill-on-invalid-dep": "yes"},
    }


def queued_jobs(directory: str) -> list[str]:
    """The jobs squeue lists (pending or running) whose SLURM log lies under `directory`."""
    result = subprocess.run(
        ["squeue", "-h", "-O", "JobID:40,STDOUT:4096"], stdout=subprocess.PIPE, text=True, check=True
    )
    prefix = os.path.join(os.path.abspath(directory), "")
    rows = [line.strip().split(maxsplit=1) for line in result.stdout.splitlines() if line.strip()]
    return [row[0] for row in rows if len(row) == 2 and row[1].startswith(prefix)]


def submit(executor, directory: str) -> bool:
    """Submit the last stage's executor (datatrove submits the stages it depends on first) unless jobs of an earlier
    submission into `directory` are still in squeue; False when every task of it was already complete (nothing
    submitted for it). sbatch's refusal ends in one RecipeError."""
    try:
        queued = queued_jobs(directory)
        if queued:
            raise RecipeError(
                f"{directory}: jobs {', '.join(queued)} of an earlier submission are still queued or running "
                "(squeue); run the same command once they have ended (it submits only the tasks that failed), or "
                "scancel them first."
            )
        executor.run()
    except FileNotFoundError as error:
        raise RecipeError(
            f"--executor slurm: {error.filename or 'sbatch'} not found; run prepare_data.py where SLURM's commands "
            "are (a login node)."
        ) from None
    except subprocess.CalledProcessError as error:
        raise RecipeError(
            f"--executor slurm: {os.path.basename(error.cmd[0])} failed (exit {error.returncode}; its message is "
            "above); check that SLURM answers here (sinfo), and --slurm_partition, --slurm_time and the memory."
        ) from None
    return executor.job_id != -1
