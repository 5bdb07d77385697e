"""Timed training steps: each path trains `warmup` untimed optimizer steps, then `steps` timed ones, with the
Trainer; ThroughputCallback measures every path alike (tokens/s, TFLOP/s, MFU, peak memory, data wait).

A path that fails (out of memory included) is recorded with its error, and the other paths still run.
"""

import gc
import json
import time
import traceback

import torch
from transformers import TrainerCallback, set_seed

from starcoder2_train.benchmarking.paths import TrainingPath
from starcoder2_train.model.factory import create_model
from starcoder2_train.training.throughput import ThroughputCallback
from starcoder2_train.training.trainer import PretrainingTrainer

BEST_BY = "real_tokens_per_second_per_device"


class TimedSteps(TrainerCallback):
    """Discard the warm-up steps, then take the ThroughputCallback's figures over the timed steps."""

    def __init__(self, throughput: ThroughputCallback, warmup: int, steps: int):
        self.throughput, self.warmup, self.steps = throughput, warmup, steps
        self.figures, self.loss, self._start = None, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in (self.warmup, self.warmup + self.steps):
            return
        if args.device.type == "cuda":
            torch.cuda.synchronize(args.device)  # the device's queued work belongs to the steps before
        if state.global_step == self.warmup:
            self.throughput.measure()  # starts the timed interval
            self._start = time.perf_counter()
        else:
            self.figures = self.throughput.measure(args.world_size)
            self.figures["seconds_per_step"] = (time.perf_counter() - self._start) / self.steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]


def run_path(name: str, path: TrainingPath, config, warmup: int, steps: int) -> dict:
    """Train warmup + steps optimizer steps; the timed figures, or the error that stopped the path."""
    training_args = path.training_args
    set_seed(training_args.seed)
    throughput = ThroughputCallback(training_args.peak_flops)
    timer = TimedSteps(throughput, warmup, steps)
    model = trainer = None
    start = time.perf_counter()
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
        trainer.train()
        result = dict(timer.figures or {"error": "the timed steps did not complete"}, final_loss=timer.loss)
    except torch.OutOfMemoryError as error:
        result = {"error": f"out of memory: {str(error).splitlines()[0]}"}
    except Exception as error:  # recorded, so that the other path and later cases still run
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    result.update(wall_seconds=round(time.perf_counter() - start, 1), attention=path.attention)
    if torch.cuda.is_available():
        result.setdefault("peak_memory_gb", torch.cuda.max_memory_allocated() / 1e9)
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def run_paths(paths: dict[str, TrainingPath], config, warmup: int, steps: int, repeats: int = 1):
    """(each path's best result, every result of each path): the fastest repeat in useful tokens/s, or the
    last one when none finished; with repeats > 1 the best result says how many repeats it was chosen from."""
    # On a shared machine other work steals time: alternate the paths and keep each one's best repeat.
    runs = {name: [] for name in paths}
    for _ in range(repeats):
        for name, path in paths.items():
            runs[name].append(run_path(name, path, config, warmup, steps))
    best = {}
    for name, results in runs.items():
        finished = [r for r in results if r.get(BEST_BY)]
        chosen = max(finished, key=lambda r: r[BEST_BY]) if finished else results[-1]
        best[name] = dict(chosen, repeats=len(results)) if repeats > 1 else chosen
    return best, runs


def useful_tokens_ratio(results: dict) -> float | None:
    """Useful tokens/s of ours over plain, where both finished."""
    ours, plain = results.get("ours", {}), results.get("plain", {})
    if ours.get(BEST_BY) and plain.get(BEST_BY):
        return ours[BEST_BY] / plain[BEST_BY]
    return None
