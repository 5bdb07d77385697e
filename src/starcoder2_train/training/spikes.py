"""Loss spikes and non-finite steps: detected, agreed by every rank, rolled back, their windows skipped.

PaLM (Chowdhery et al. 2022, section 5.1) answered its loss spikes by restarting from a checkpoint about 100
steps before the spike and skipping the 200-500 batches around it. `SpikeMonitor` (a TrainerCallback, recipe keys
`spike_detection`, `spike_factor`, `spike_window`, `spike_skip_steps`, `max_rollbacks`) does the same:

1. **Detection, no host sync per micro batch.** PretrainingTrainer hands it each micro batch's loss
   (`add_loss`: a device add, no read) and the step's gradient norm (`set_grad_norm`). At the end of optimizer
   step N the step's two values are copied to pinned host memory without blocking, behind a CUDA event; they are
   read at the end of step N + 1, when the copy finished long ago: no wait at all. At a step that saves or ends
   training they are read at once (a save waits for the GPU anyway), so **no checkpoint is ever written after a
   step that was not judged**: the newest complete checkpoint is always from before a detected spike. DeepSpeed's
   optimizer step already reads the norm on the host (1 to 4 reads a step, accelerate_configs/deepspeed/README.md,
   DeepSpeed 0.19.8), but before its update: a read at the step's end would still wait for the update and, under
   ZeRO-1/2, the all-gather of the updated weights. Under DDP and FSDP the gradient norm stays a tensor
   (PretrainingTrainer._get_grad_norm), and one `.item()` a step would stall the queue once a step. The one-step
   delay avoids both.
2. **Agreement.** Every rank adds [its step loss, 1 if its loss or the gradient norm is not finite] into one gloo
   all-reduce (SUM) of 2 float64 on the CPU side group of training/preemption.py (~1-10 ms over 160 ranks, no
   device sync). Every rank then holds the same mean loss, the same flag and the same history, so every rank
   makes the same decision at the same step without a second collective (on a spike alone, one more: rank 0's
   count of earlier rollbacks, so that ranks whose output_dir is not shared still agree on the bound).
3. **The rule.** A step is a spike when some rank's loss or the gradient norm is not finite, or when the mean
   loss exceeds `spike_factor` x the median of the last `spike_window` accepted steps (judged only once the
   window is full; the history goes into each checkpoint's trainer_state.json, so a resumed run keeps it).
4. **The answer.** Training stops at that step without saving. `exit_for_rollback` (rank 0) then writes the
   windows of the `spike_skip_steps` steps ending with the spike into OUTPUT_DIR/skipped_windows.json (global
   window indices, through training/data_position.py: the resumed sampler never hands them out), appends the event
   to OUTPUT_DIR/spike_rollbacks.json, writes the requeue file when STARCODER2_REQUEUE_FILE is set (so
   scripts/slurm/train.sbatch requeues the job, as after a preemption), and every rank exits with
   ROLLBACK_EXIT_CODE. The same command resumes from the newest complete checkpoint, which is from before the spike.
5. **The bound.** A spike after `max_rollbacks` rollbacks of this output_dir stops the run with an error that names
   every rolled-back step (SpikeError, exit status 1); nothing more is skipped. The stop is recorded but not
   counted: with max_rollbacks raised, the same command goes on.

Why a clean exit and not an in-process reload: the windows to skip are known only after the spike, and the
Trainer's epoch iterator, its accelerate-wrapped dataloader and, under DeepSpeed, the engine (its optimizer
partitions, its gloo/NCCL groups, ZeRO-3's parameter hooks) are built once per `train()`; a second `train()` in
the same process re-wraps a wrapped model. A new process takes the resume path every restart already takes
(tested for exact continuation), frees everything a non-finite step may have left behind, and under SLURM is a
requeue like a preemption. What it costs: the steps since the newest complete checkpoint (at most save_steps) and
one restart. A copy kept in host memory instead would cost, at the 3B scale on 160 ranks under ZeRO-2, each rank's
optimizer partition (fp32 master weights + Adam's two moments: 12 bytes x 3.03e9 / 160 = 227 MB per rank, 1.8 GB
per 8-GPU node; the bf16 weights are rebuilt from the masters) and a ~10 ms copy each time; under DDP a whole copy
(16 bytes a parameter: 48 GB per rank). It is not used: rewinding the data position in-process is what the Trainer
cannot do.
"""

import collections
import json
import logging
import math
import os
import statistics

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from starcoder2_train.configs import RecipeError, windows_per_step
from starcoder2_train.training.checkpoints import _write_json, newest_complete_checkpoint  # atomic, fsynced
from starcoder2_train.training.preemption import REQUEUE_FILE_ENV, all_ranks_max, cpu_group, exit_for_restart

logger = logging.getLogger(__name__)

ROLLBACK_EXIT_CODE = 76  # a spike rolled back: the same command resumes from before it (75 is a preemption)
ROLLBACKS_FILE = "spike_rollbacks.json"  # OUTPUT_DIR: {"rollbacks": [one record per event]}, rank 0 writes it


class SpikeError(RecipeError):
    """A spike after max_rollbacks rollbacks: the run stops (one `error:` line, exit status 1)."""


def judge(loss: float, nonfinite: bool, history, factor: float, window: int) -> str | None:
    """Why the step is a spike (one phrase), or None: `nonfinite` (some rank's loss or the gradient norm was NaN
    or inf), else a mean `loss` above `factor` x the median of `history` (the last `window` accepted steps'
    losses), judged only once `history` holds `window` of them."""
    if nonfinite or not math.isfinite(loss):
        return "a non-finite loss or gradient norm"
    if len(history) >= window:
        median = statistics.median(history)
        if loss > factor * median:
            return f"loss {loss:.4g} > {factor:g} x {median:.4g}, the median of the last {window} steps"
    return None


def all_ranks_sum(values: list[float]) -> list[float]:
    """The element-wise sum of `values` over all ranks (float64, through the gloo side group); as is in one process."""
    group = cpu_group()
    if group is None:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.tolist()


def read_rollbacks(output_dir: str) -> list[dict]:
    """The spikes recorded in output_dir, oldest first: rollbacks, and stops (`"stopped": true`, which do not
    count against max_rollbacks: raising it lets the same command go on)."""
    try:
        with open(os.path.join(output_dir, ROLLBACKS_FILE)) as handle:
            return json.load(handle)["rollbacks"]
    except FileNotFoundError:
        return []


class _Staged:
    """One step's [loss, gradient norm] on its way to the host: a non-blocking copy into pinned memory behind a
    CUDA event on a GPU, the values themselves elsewhere (a CPU tensor is already on the host)."""

    def __init__(self, step: int, values: torch.Tensor):
        self.step, self.event = step, None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> tuple[float, float]:
        if self.event is not None:
            self.event.synchronize()  # recorded a step ago: long done
        loss, grad_norm = self.host.tolist()
        return loss, grad_norm


class SpikeMonitor(TrainerCallback, ExportableState):
    """Judges every optimizer step (module docstring); set `trainer.spike_monitor` and add it as the last
    callback (`attach`), so that its veto of a save comes after every other callback's request."""

    def __init__(self, factor: float, window: int, skip_steps: int, max_rollbacks: int, history=()):
        self.factor, self.window, self.skip_steps, self.max_rollbacks = factor, window, skip_steps, max_rollbacks
        self.history = collections.deque(history, maxlen=window)  # accepted steps' mean losses, oldest first
        self.spike = None  # {"step", "reason", "loss", "grad_norm"}: agreed on every rank at the same step
        self.stop = False  # the spike came after max_rollbacks rollbacks
        self._loss = None  # this step's loss so far, on the device
        self._grad_norm = None
        self._pending = []  # _Staged steps not yet judged (at most one between step ends)

    @classmethod
    def attach(cls, trainer) -> "SpikeMonitor | None":
        """A monitor for `trainer` when its args set spike_detection, added last; None otherwise."""
        args = trainer.args
        if not getattr(args, "spike_detection", False):
            return None
        monitor = cls(args.spike_factor, args.spike_window, args.spike_skip_steps, args.max_rollbacks)
        trainer.spike_monitor = monitor
        trainer.add_callback(monitor)
        return monitor

    # -- fed by PretrainingTrainer, on the device ----------------------------------------------------------------

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro batch's loss (as training_step returns it: already divided by the accumulation steps)."""
        loss = loss.detach().float().reshape(())
        self._loss = loss if self._loss is None else self._loss + loss

    def set_grad_norm(self, grad_norm) -> None:
        """The step's gradient norm: a tensor, a float (DeepSpeed) or None (none computed)."""
        self._grad_norm = grad_norm

    def _step_values(self) -> torch.Tensor:
        """[this step's loss, its gradient norm] on the step's device, made without a host read: a float norm
        (DeepSpeed's, already on the host) or none (0: only the loss is judged) is written by a fill kernel, not
        copied from pageable memory, which could wait for the queue."""
        loss, norm = self._loss, self._grad_norm
        device = loss.device if loss is not None else norm.device if torch.is_tensor(norm) else torch.device("cpu")
        if loss is None:  # no micro batch reached training_step this step
            loss = torch.full((), float("nan"), device=device)
        if not torch.is_tensor(norm):
            norm = torch.full((), 0.0 if norm is None else float(norm), device=device)
        return torch.stack([loss, norm.detach().float().reshape(()).to(device)])

    # -- state kept in checkpoints (trainer_state.json's stateful_callbacks) -----------------------------------

    def state(self) -> dict:
        return {"args": {}, "attributes": {"history": list(self.history)}}

    def on_train_begin(self, args, state, control, **kwargs):
        cpu_group()  # collective creation, on every rank at the same point
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict) and not self.history:
            self.history.extend(saved.get("attributes", {}).get("history", []))
        self._pending.clear()
        self._loss = self._grad_norm = None

    def on_step_end(self, args, state, control, **kwargs):
        self._pending.append(_Staged(state.global_step, self._step_values()))
        self._loss = self._grad_norm = None
        # A step that saves or ends training is judged at once (with the one before it); others a step late.
        return self._settle(args, state, control, at_once=control.should_save or control.should_training_stop)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._settle(args, state, control, at_once=control.should_save)  # save_strategy: epoch

    def on_train_end(self, args, state, control, **kwargs):
        return self._settle(args, state, control, at_once=True)  # the data ran out: the last step before the save

    def _settle(self, args, state, control, at_once: bool):
        """Judge the pending steps but the newest (all of them `at_once`); on a spike, veto saving and stop."""
        while self._pending and (len(self._pending) > 1 or at_once) and self.spike is None:
            self._judge(self._pending.pop(0), args, state)
        if self.spike is not None:
            self._pending.clear()
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True
        return control

    def _judge(self, staged: _Staged, args, state) -> None:
        loss, grad_norm = staged.read()
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        world = max(1, args.world_size)
        total_loss, nonfinite_ranks = all_ranks_sum([loss if math.isfinite(loss) else 0.0, float(nonfinite)])
        mean = total_loss / world
        reason = judge(mean, nonfinite_ranks > 0, self.history, self.factor, self.window)
        if reason is None:
            self.history.append(mean)
            return
        median = statistics.median(self.history) if self.history else None
        self.spike = {"step": staged.step, "reason": reason, "loss": None if nonfinite_ranks else mean,
                      "grad_norm": grad_norm, "median": median, "nonfinite_ranks": int(nonfinite_ranks)}  # fmt: skip
        # rank 0's count, so that every rank decides alike even where output_dir is not shared
        count = len(_rolled_back(read_rollbacks(args.output_dir))) if args.process_index == 0 else 0
        earlier = all_ranks_max(count)
        self.stop = earlier >= self.max_rollbacks
        logger.warning(
            "spike: step %d: %s (mean loss %.6g, gradient norm %.6g, ranks with a non-finite value %d); %s",
            staged.step, reason, mean, grad_norm, int(nonfinite_ranks),
            "stopping: max_rollbacks reached" if self.stop else "stopping to roll back",
        )  # fmt: skip

    # -- after trainer.train() returned ----------------------------------------------------------------------

    def exit_for_rollback(self, trainer, close_process_group) -> None:
        """Rank 0 records the spike, writes its windows to skip and the requeue file; every rank exits with
        ROLLBACK_EXIT_CODE. After max_rollbacks: SpikeError (exit status 1) instead, nothing skipped."""
        args, spike = trainer.args, self.spike
        output_dir = args.output_dir
        events = read_rollbacks(output_dir)
        earlier = _rolled_back(events)
        checkpoint, _ = newest_complete_checkpoint(output_dir, getattr(trainer, "run_recipe", None))
        resumed_from = _step_of(checkpoint)
        first = max(resumed_from + 1, spike["step"] - self.skip_steps + 1)
        record = dict(spike, checkpoint=checkpoint, skipped_steps=[first, spike["step"]], rollback=len(earlier) + 1)
        if self.stop:
            record.update(rollback=None, stopped=True, skipped_steps=None)
            steps = ", ".join(str(entry["step"]) for entry in earlier)
            message = (
                f"spike_detection: step {spike['step']}: {spike['reason']}, after {len(earlier)} rollbacks "
                f"(max_rollbacks: {self.max_rollbacks}{'; at steps ' + steps if steps else ''}); the run stops. "
                f"Every spike is recorded in {os.path.join(output_dir, ROLLBACKS_FILE)}. Look at the data of those "
                "steps, lower learning_rate or max_grad_norm, or raise max_rollbacks; the same command then resumes "
                f"from {checkpoint or 'the start'}."
            )
        if trainer.is_world_process_zero():
            if not self.stop:
                record["windows"] = _skip_windows(output_dir, checkpoint, first, spike["step"], args, spike)
            _write_json(os.path.join(output_dir, ROLLBACKS_FILE), {"rollbacks": events + [record]})
            requeue = os.environ.get(REQUEUE_FILE_ENV)
            if requeue and not self.stop:
                os.makedirs(os.path.dirname(os.path.abspath(requeue)), exist_ok=True)
                _write_json(requeue, {"reason": "spike rollback", "checkpoint": checkpoint, "step": spike["step"],
                                      "exit_code": ROLLBACK_EXIT_CODE})  # fmt: skip
            if self.stop:
                logger.error("%s", message)
            else:
                logger.warning(
                    "spike: rollback %d of at most %d: step %d (%s); windows %s of steps %d-%d skipped "
                    "(skipped_windows.json); the same command resumes from %s (exit status %d)",
                    record["rollback"], self.max_rollbacks, spike["step"], spike["reason"], record["windows"],
                    first, spike["step"], checkpoint or "the start (no complete checkpoint yet)", ROLLBACK_EXIT_CODE,
                )  # fmt: skip
        if self.stop:
            close_process_group(exit_code=1)  # a multi-process run ends here (rank 0 logged the error)
            raise SpikeError(message)
        exit_for_restart(ROLLBACK_EXIT_CODE, close_process_group)  # 0 where the requeue file says why


def _rolled_back(events: list[dict]) -> list[dict]:
    return [event for event in events if not event.get("stopped")]


def _step_of(checkpoint: str | None) -> int:
    return int(os.path.basename(checkpoint).rsplit("-", 1)[1]) if checkpoint else 0


def _skip_windows(output_dir: str, checkpoint: str | None, first: int, last: int, args, spike) -> list:
    """Add the global windows of steps first..last (trained after `checkpoint`, or after the start) to
    OUTPUT_DIR/skipped_windows.json (training/data_position.py) and return them, as [[start, stop], ...]. The
    position is the checkpoint's data_position.json with every range skipped so far: what the resumed sampler
    will hand out from there."""
    from starcoder2_train.training import data_position  # the resume sampler's ranges

    current = data_position.read_skipped_windows(output_dir)
    saved = data_position.read_position(checkpoint) if checkpoint else None
    if saved is None:  # the start, or a checkpoint written before data_position.json existed
        step, size = _step_of(checkpoint), windows_per_step(args)
        saved = {"next_window": data_position.advance(0, step * size, current), "global_step": step}
        saved["windows_per_step"] = size
    skipped = data_position.merge_ranges([*saved.get("skipped_windows", []), *current])
    ranges = data_position.windows_of_steps(dict(saved, skipped_windows=skipped), first, last)
    why = f"{spike['reason']} at step {spike['step']}"
    for start, stop in ranges:
        reason = {"range": [start, stop], "steps": [first, last], "why": why}
        data_position.write_skipped_windows(output_dir, [(start, stop)], reason=reason)
    return [list(window) for window in ranges]
