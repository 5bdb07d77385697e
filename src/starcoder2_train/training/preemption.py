"""Stop on SLURM's warning signal at the same optimizer step on every rank, save a checkpoint, exit for a requeue.

SLURM warns a job before it ends it (`#SBATCH --signal=USR1@120`: SIGUSR1 120 s before the time limit) and
sends SIGTERM when it cancels or preempts it. `PreemptionCallback`:

1. `install()` puts a handler on SIGTERM and SIGUSR1 that only records the signal (no I/O, no lock, no
   collective in a handler: it runs between two bytecodes of whatever the main thread was doing).
2. At the end of every `check_every_steps`-th optimizer step (`on_step_end`), every rank contributes its flag to
   an all-reduce (MAX) on a **gloo side group** (`cpu_group()`), so all ranks agree on the same step even when the
   signal reached them at different times, or reached only one of them.
3. On that step the callback asks the Trainer for a checkpoint (`should_save`: the Trainer's normal checkpoint,
   model, optimizer, scheduler, RNG, trainer_state, DeepSpeed's too, written atomically by
   training/checkpoints.py) and to stop (`should_training_stop`; evaluation at that step is skipped).
4. `exit_for_requeue()` (scripts/run_pretrain.py calls it when `requested`) writes the requeue file, waits for
   every rank and exits with `REQUEUE_EXIT_CODE`. The same command started again resumes by itself from the
   newest complete checkpoint.

Why gloo and every step: the flag is a 1-element int64 CPU tensor; a gloo all-reduce of it costs no host-device
synchronisation (the GPU queue keeps running) and, measured by its latency, about 1-10 ms over 160 ranks (TCP),
against an optimizer step of ~3 s for StarCoder2-3B on 160 GPUs: well under 1%. It does align the hosts once a
step, which the gradient all-reduce already does. An NCCL all-reduce of a CUDA flag would instead need `.item()`,
a host-device sync per step. `check_every_steps=N` trades that cost for up to N - 1 more steps before the stop.

Time to exit, at scale: at most `check_every_steps` optimizer steps, plus one checkpoint save (the 3B model's
~36 GB of ZeRO-2 optimizer state is written in parallel, ~225 MB per rank over 160 ranks, plus ~12 GB of fp32
weights by rank 0), plus process teardown. Size `--signal=USR1@T` so that T covers it with room (120 s on a
parallel filesystem that writes ~1 GB/s per node). A signal that arrives after the last step changes nothing:
the run ends normally with status 0.

Why exit status 75: EX_TEMPFAIL of sysexits.h ("temporary failure, retry later"), used by no Python error (1),
signal death (128 + n) or launcher; scripts/slurm/train.sbatch requeues the job on it. `accelerate launch`
(torchrun) turns any worker's non-zero status into its own status 1, so for launched runs the ranks also write
the file named by the environment variable `REQUEUE_FILE_ENV` (the sbatch script sets it), which the requeue script
checks as well. Where that file is the channel (it is set, and the ranks run under torch elastic's agent), the ranks
exit 0 instead (`restart_exit_code`): a non-zero worker makes the agent print a `ChildFailedError` traceback before
"preempted", which reads like a crash, and its status says nothing the file does not.

transformers' own `enable_jit_checkpoint` (trainer_jit_checkpoint.py) is not used: it handles SIGTERM only, each
rank decides alone (under DeepSpeed a rank that saves while another trains hangs both), and it saves in place.
"""

import json
import logging
import os
import signal

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; scripts/slurm/train.sbatch requeues the job on it
REQUEUE_FILE_ENV = "STARCODER2_REQUEUE_FILE"  # where rank 0 writes {"checkpoint", "step", "signal"} on a stop


def restart_exit_code(code: int) -> int:
    """The status a rank exits with when it stops for a restart (`code`: 75 preemption, 76 spike rollback): 0 under
    torch elastic's agent (TORCHELASTIC_RUN_ID set: torchrun, `accelerate launch` of several processes) when
    REQUEUE_FILE_ENV is set, whose file then says why; else `code`, the only channel there is."""
    if os.environ.get(REQUEUE_FILE_ENV) and os.environ.get("TORCHELASTIC_RUN_ID"):
        return 0
    return code


def exit_for_restart(code: int, close_process_group):
    """End this rank's run for a restart (preemption, spike rollback): every rank waits for the others
    (training/distributed.py `close_process_group`, passed in) and exits with `restart_exit_code(code)`."""
    status = restart_exit_code(code)
    close_process_group(exit_code=status)
    raise SystemExit(status)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_cpu_group = None


def cpu_group():
    """A gloo process group over all ranks (made once, collectively), or None without torch.distributed.

    Every rank must call it at the same point the first time (new_group is a collective); the callbacks and
    checkpoints.py call it at the start of training and at every save, which every rank reaches."""
    global _cpu_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _cpu_group


def all_ranks_max(value: int) -> int:
    """The largest `value` over all ranks (an int on the CPU, through the gloo group); `value` in one process."""
    group = cpu_group()
    if group is None:
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


class PreemptionCallback(TrainerCallback):
    """Turns SIGTERM/SIGUSR1 into a checkpoint and a stop at the same optimizer step on every rank (module doc)."""

    def __init__(self, check_every_steps: int = 1, signals=STOP_SIGNALS):
        if check_every_steps < 1:
            raise ValueError(f"check_every_steps: {check_every_steps} must be at least 1.")
        self.check_every_steps = check_every_steps
        self.signals = tuple(signals)
        self.received = None  # the signal number this process received (set by the handler, read at a step end)
        self.requested = False  # all ranks agreed to stop: set at the same step on every rank
        self.stopped_at = None  # that step
        self._previous = {}

    def install(self) -> "PreemptionCallback":
        """Put the flag-only handler on `signals` (main thread only, as Python requires). Returns self."""
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals back their previous handlers."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.received = signum  # only a flag: everything else happens at the next step end

    def on_train_begin(self, args, state, control, **kwargs):
        cpu_group()  # collective creation, on every rank at the same point

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested or state.global_step % self.check_every_steps:
            return control
        if not all_ranks_max(int(self.received is not None)):
            return control
        self.requested, self.stopped_at = True, state.global_step
        name = signal.Signals(self.received).name if self.received else "a signal to another rank"
        logger.warning(
            "preemption: %s received; saving a checkpoint at step %d and stopping (exit status %d)",
            name,
            state.global_step,
            REQUEUE_EXIT_CODE,
        )
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False
        return control

    def exit_for_requeue(self, trainer, close_process_group) -> None:
        """After `trainer.train()` returned because of a stop: write the requeue file (rank 0, when
        `REQUEUE_FILE_ENV` is set), wait for every rank (`close_process_group`) and exit with REQUEUE_EXIT_CODE."""
        checkpoint = os.path.join(trainer.args.output_dir, f"checkpoint-{self.stopped_at}")
        path = os.environ.get(REQUEUE_FILE_ENV)
        if path and trainer.is_world_process_zero():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            record = {"checkpoint": checkpoint, "step": self.stopped_at, "exit_code": REQUEUE_EXIT_CODE}
            record["signal"] = signal.Signals(self.received).name if self.received else None
            with open(path, "w") as handle:
                json.dump(record, handle)
                handle.flush()
                os.fsync(handle.fileno())
        logger.warning(
            "preemption: checkpoint %s is complete; exiting with status %d so that the job is requeued; "
            "the same command resumes from it",
            checkpoint,
            REQUEUE_EXIT_CODE,
        )
        # the requeue file is written before any rank exits; a multi-process run ends there with the status
        exit_for_restart(REQUEUE_EXIT_CODE, close_process_group)
