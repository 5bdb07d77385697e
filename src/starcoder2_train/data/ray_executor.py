"""`prepare_data.py --executor ray`: datatrove's RayPipelineExecutor, with what it leaves to its caller done here.

What datatrove's executor does (datatrove 0.10.1, datatrove/executor/ray.py, read from the installed source; Ray
2.60): the executor itself is `ray.put` once; each task is a Ray actor reserving `cpus_per_task` CPUs and
`mem_per_cpu_gb` × `cpus_per_task` GB of Ray's memory resource (datatrove's defaults, 1 and 2: a scheduling
reservation, not a limit), which runs the task in a child process; a finished task writes
`logging_dir/completions/<rank>`, and a rerun starts only the tasks without one; each task's log is copied to
`logging_dir/logs/task_<rank>.log`; Ray-side failures (a worker or node lost) are resubmitted up to 3 times.
The tasks run the same pipeline objects as the local executor's, so they write the same bytes (tests/test_ray.py).

What it leaves to the caller, done by `RayStage`:
- a connection: datatrove expects `ray.init()` before `run`. A stage connects when this process is not connected
  yet, with plain `ray.init()`: the cluster of RAY_ADDRESS, else the one `ray start` last started on this
  machine, else a new local instance (all CPUs of this machine) that ends with the run.
- the stage before: datatrove's `depends` polls the stage before every 2 minutes until all its tasks are complete,
  forever when one of them failed. A stage here runs the one before it first and stops if that one failed.
- a failed task: datatrove logs "Only k/n tasks completed" and returns (an exception in a task is not retried).
  Here that ends the command with one line naming the stage's failed tasks and their logs; the same command again
  runs only those.
- a cluster too small for one task: a placement group that no node can hold waits forever. Refused first, naming
  the largest node's CPUs and memory against one task's reservation.
- the task's log, written first under a fixed temporary path named by rank only: here a folder of the task's own.
"""

import contextlib
import os
import tempfile

from datatrove.executor import RayPipelineExecutor

from starcoder2_train.configs import RecipeError

GIB = 1024**3


@contextlib.contextmanager
def connected():
    """Ray connected for the block: the connection this process already has, else `ray.init()` (RAY_ADDRESS, the
    cluster `ray start` last started here, or a new local instance), shut down after the block."""
    try:
        import ray
    except ImportError:
        raise RecipeError(
            "--executor ray needs Ray: pip install -e '.[ray]' (or pip install ray), or use --executor local."
        ) from None
    if ray.is_initialized():
        yield
        return
    ray.init()
    try:
        yield
    finally:
        ray.shutdown()


class RayStage(RayPipelineExecutor):
    """One stage of the preparation on Ray: datatrove's RayPipelineExecutor whose `run` connects, runs the stage
    before it (`depends`) first, checks that a node can hold one task, and raises when a task did not complete."""

    def __init__(self, pipeline: list, *, depends: "RayStage | None" = None, **options):
        super().__init__(pipeline, **options)  # datatrove's own `depends` left None: its wait polls forever
        self.before = depends

    def __getstate__(self) -> dict:
        """The executor is sent to every task (`ray.put`): without the stages before it, which the task never
        reads."""
        return {**self.__dict__, "before": None}

    def run(self):
        with connected():
            if self.before is not None:
                self.before.run()
            if self.get_incomplete_ranks():
                self.check_nodes()
            super().run()
            failed = self.get_incomplete_ranks()
        if failed:
            folder = self.logging_dir.path
            logs = ", ".join(os.path.join(folder, "logs", f"task_{rank:05d}.log") for rank in failed[:3])
            more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
            raise RecipeError(
                f"--executor ray: {len(failed)} of {self.world_size} tasks of {folder} failed (their logs: "
                f"{logs}{more}); the same command again runs only the tasks that did not complete."
            )

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        """datatrove's task, with its log first written in a folder of this task's own, removed after: datatrove
        writes it to `<tempfile.gettempdir()>/ray_logs/logs/task_<rank>.log` (opened "w", named by rank only:
        two preparations on one machine would truncate each other's) and copies it to the logging dir at the
        end. The task runs in a child process of its own, so setting `tempfile.tempdir` there touches nothing
        else."""
        with tempfile.TemporaryDirectory(prefix=f"prepare-ray-task-{rank:05d}-") as folder:
            previous, tempfile.tempdir = tempfile.tempdir, folder
            try:
                return super()._run_for_rank(rank, local_rank, node_rank)
            finally:
                tempfile.tempdir = previous

    def check_nodes(self) -> None:
        """Refuse a cluster where no live node has one task's CPUs and memory (its placement group would wait
        forever)."""
        import ray

        cpus, memory = self.cpus_per_task, self.mem_per_cpu_gb * self.cpus_per_task * GIB
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        if any(node.get("CPU", 0) >= cpus and node.get("memory", 0) >= memory for node in nodes):
            return
        largest = max(nodes, key=lambda node: (node.get("CPU", 0), node.get("memory", 0)), default={})
        raise RecipeError(
            f"--executor ray: a task reserves {cpus} CPU(s) and {memory / GIB:g} GB of Ray memory, and the largest "
            f"node has {largest.get('CPU', 0):g} CPU(s) and {largest.get('memory', 0) / GIB:.1f} GB: start Ray "
            "with more (ray start --num-cpus, --memory) or run on a larger machine."
        )
