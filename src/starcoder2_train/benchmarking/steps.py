"""Timed training steps of one path, in this process: warm-up until compilation stops, then a timed interval.

`run_path` trains with the Trainer (max_steps set far beyond what is run; the `TimedSteps` callback stops
training): at least `warmup` optimizer steps, and more while a step still compiled something (torch._dynamo's
graph and AOT-autograd counters moved; at most `max_warmup` steps), then either `steps` timed steps or as many
as end after `seconds` of timing. ThroughputCallback measures the timed interval (tokens/s, TFLOP/s, MFU,
peak memory, data wait, and what else it reports, such as gpu_idle_share). With `profile_steps`, the interval
after the warm-up is profiled instead of timed (profile.py); with `profile_after`, that many steps after the
timed interval are profiled in the same process (`figures["profile"]`), which spares a profiled process its
start, model build, DeepSpeed init and compilation. Each micro batch's loss is kept (detached, read
once at the end: no synchronisation per step), so that two runs on the same data and seed can be compared.

A path that fails (out of memory included) is recorded with its error.
"""

import dataclasses
import gc
import json
import time
import traceback

import torch
from transformers import TrainerCallback, set_seed

from starcoder2_train.benchmarking import profile
from starcoder2_train.benchmarking.paths import TrainingPath
from starcoder2_train.model.factory import create_model
from starcoder2_train.training.throughput import ThroughputCallback
from starcoder2_train.training.trainer import PretrainingTrainer


@dataclasses.dataclass
class Timing:
    """How long a path runs: warm-up steps (at least), then `steps` timed steps if set, else `seconds`; then
    `profile_after` profiled steps, if set."""

    warmup: int = 10
    seconds: float = 60.0
    steps: int | None = None
    profile_steps: int = 0
    profile_after: int = 0

    @property
    def max_warmup(self) -> int:
        return 3 * self.warmup + 10


def compilations() -> int:
    """Graphs compiled so far in this process (dynamo's unique graphs plus AOT-autograd compilations)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"] + counters["aot_autograd"]["total"]


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedSteps(TrainerCallback):
    """Warm up, then time (or profile) an interval of steps and stop training (see the module's docstring)."""

    def __init__(self, throughput: ThroughputCallback, timing: Timing):
        self.throughput, self.timing = throughput, timing
        self.figures, self.loss, self.warmup_steps = None, None, None
        self._phase, self._compiled, self._start, self._start_step, self._profiler = "warmup", 0, None, 0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self._compiled = compilations()
        if self.timing.warmup == 0:
            self._begin(args, state.global_step)

    def _begin(self, args, step: int) -> None:
        synchronize(args.device)
        self.warmup_steps, self._start_step, self._phase = step, step, "timed"
        self.compiled_before_timing = compilations()
        if self.timing.profile_steps:
            self._profiler = torch.profiler.profile(activities=profile.activities(args.device.type))
            self._profiler.__enter__()
        else:
            self.throughput.measure()  # starts the timed interval
        self._start = time.perf_counter()

    def _finished(self, timed_steps: int) -> bool:
        if self._phase == "profile":
            return timed_steps >= self.timing.profile_after
        if self.timing.profile_steps:
            return timed_steps >= self.timing.profile_steps
        if self.timing.steps:
            return timed_steps >= self.timing.steps
        return time.perf_counter() - self._start >= self.timing.seconds

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self._phase == "warmup":
            now = compilations()
            compiled, self._compiled = now != self._compiled, now
            if step < self.timing.warmup or (compiled and step < self.timing.max_warmup):
                return
            self.still_compiling = compiled
            self._begin(args, step)
            return
        if self._phase not in ("timed", "profile") or not self._finished(step - self._start_step):
            return
        synchronize(args.device)  # the device's queued work belongs to the interval
        seconds = time.perf_counter() - self._start
        timed = step - self._start_step
        if self._phase == "profile":  # after the timed interval: its figures are already kept
            self._profiler.__exit__(None, None, None)
            self.figures["profile"] = profile.summarize(self._profiler, seconds, args.device.type, timed)
            self._stop(control)
            return
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.figures = {"profile": profile.summarize(self._profiler, seconds, args.device.type, timed)}
        else:
            self.figures = self.throughput.measure(args.world_size)
        self.figures.update(
            seconds_per_step=seconds / max(timed, 1),
            timed_steps=timed,
            timed_seconds=seconds,
            warmup_steps=self.warmup_steps,
            compiled_during_timing=compilations() - self.compiled_before_timing,
            still_compiling_at_end_of_warmup=self.still_compiling if self.timing.warmup else False,
        )
        if self.timing.profile_after and self._profiler is None:
            self._phase, self._start_step = "profile", step
            self._profiler = torch.profiler.profile(activities=profile.activities(args.device.type))
            self._profiler.__enter__()
            self._start = time.perf_counter()
            return
        self._stop(control)

    def _stop(self, control) -> None:
        self._phase = "done"
        control.should_training_stop = True
        control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]


def keep_losses(trainer) -> list:
    """Wrap `trainer.training_step` to keep each micro batch's (detached) loss; the list fills as it trains."""
    losses, original = [], trainer.training_step

    def training_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        losses.append(loss.detach())
        return loss

    trainer.training_step = training_step
    return losses


def float8_layers(model) -> int:
    """Modules of a float8 class (torchao's Float8Linear): 0 when float8 training was not applied."""
    return sum("float8" in type(module).__name__.lower() for module in model.modules())


def peak_allocated_gb() -> float | None:
    """torch.cuda.max_memory_allocated of this process (GB = 1e9 bytes), None without CUDA."""
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def run_path(name: str, path: TrainingPath, config, timing: Timing) -> dict:
    """Train until TimedSteps stops; the timed figures (or the profile), or the error that stopped the path."""
    training_args = path.training_args
    set_seed(training_args.seed)
    throughput = ThroughputCallback(training_args.peak_flops)
    timer = TimedSteps(throughput, timing)
    model = trainer = None
    losses = []
    start = time.perf_counter()
    result = {}
    try:
        device = "cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
        model = create_model(path.model_args, config, None, path.attention, device=device)
        trainer = PretrainingTrainer(
            model=model,
            args=training_args,
            train_dataset=path.dataset,
            data_collator=path.collator,
            callbacks=[throughput, timer],
        )
        losses = keep_losses(trainer)
        result["deepspeed"] = bool(getattr(trainer, "is_deepspeed_enabled", False))
        trainer.train()
        result.update(timer.figures or {"error": "the timed steps did not complete"}, final_loss=timer.loss)
    except torch.OutOfMemoryError as error:
        result["error"] = f"out of memory: {str(error).splitlines()[0]}"
    except Exception as error:  # recorded, so that the other paths and later cases still run
        traceback.print_exc()
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    result.update(wall_seconds=round(time.perf_counter() - start, 1), attention=path.attention)
    if model is not None:
        result["float8_layers"] = float8_layers(model)  # converted in place, whoever wraps the model
    result["losses"] = [float(loss) for loss in losses]
    if torch.cuda.is_available():
        result.setdefault("peak_memory_gb", torch.cuda.max_memory_allocated() / 1e9)
        result["peak_allocated_gb"] = peak_allocated_gb()
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    del trainer, model
    gc.collect()
    print(f"[{name}] {json.dumps({k: v for k, v in result.items() if k != 'losses'})}", flush=True)
    return result
