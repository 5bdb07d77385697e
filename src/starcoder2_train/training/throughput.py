"""Throughput on every log line: tokens/s, model TFLOP/s, MFU, peak memory and the time spent waiting for data.

`ThroughputCallback` adds to each training log, over the steps since the previous log:

- `tokens_per_second_per_device`, `tokens_per_second`: all tokens the model processed, padding included;
- `real_tokens_per_second_per_device`, `real_tokens_per_second`: tokens that are not padding;
- `tflops_per_device_causal`: model FLOPs per second, counted on real tokens with `model.flops.model_flops_per_token`
  in its causal convention (k = average number of keys a query attends to under the causal mask and
  sliding window; no recomputation, no padding), which is what the `_causal` in the names says;
- `mfu_causal`: that over the device's dense bf16 peak (`peak_flops`, else looked up from the GPU's name;
  absent on a CPU unless `peak_flops` is given);
- `peak_memory_gb`: the most memory allocated on the device since training started (GB = 1e9 bytes;
  on a CPU, the process's peak resident memory);
- `data_wait_share`: the share of wall time the training loop spent waiting for its next batches (host time);
- `gpu_idle_share` (CUDA): the share of wall time the GPU had no work queued between optimizer steps, measured
  with CUDA events recorded on the compute stream at the start and end of every step: the gap between one
  step's end event and the next step's start event is time the GPU sat idle waiting for the host (data, Python,
  logging). Idle time inside a step (kernel launch gaps) is the device check's profiler pass, not this figure.
  The events are read at log time only; recording them does not synchronise.

It needs to see the batches: `training.trainer.PretrainingTrainer` reports them (`record_batches`) with the time it
waited for them. Totals are this process's figures times the number of processes (data parallelism gives
each the same number of tokens). Wall time is measured between log lines; logging reads the loss, which
waits for the device, so each interval covers the device's work too.
"""

import resource
import sys
import time

import torch
from transformers import TrainerCallback

from starcoder2_train.data.special_tokens import IGNORE_INDEX
from starcoder2_train.model.flops import model_flops_per_token, peak_flops_for_device


def real_lengths(batch: dict) -> torch.Tensor:
    """Non-padding tokens of each row: `attention_mask`'s sum, or else the row minus its trailing run of labels -100.

    PackedDataset pads only the end of its last window, with labels -100; a trailing `<fim_pad>` (also -100)
    would be counted as padding too, a few tokens at most. Stays on the batch's device (no synchronisation).
    """
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].sum(dim=-1)
    labels = batch["labels"]
    ignored = (labels == IGNORE_INDEX).int()
    trailing = ignored.flip(-1).cumprod(dim=-1).sum(dim=-1)
    return labels.shape[-1] - trailing


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KB on Linux
    return kilobytes / (1e9 if sys.platform == "darwin" else 1e6)


class ThroughputCallback(TrainerCallback):
    """Adds throughput, MFU, peak memory and data-wait figures to every training log (see the module's docstring)."""

    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self.config = None
        self.device = torch.device("cpu")
        self._flops_per_token = {}
        self._last_end = None  # CUDA: the event at the last step's end, where the next interval's first gap starts
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._interval_start = now
        self._lengths = []  # per batch: (row width, real tokens per row as a tensor)
        self._wait = 0.0
        self._events = []  # CUDA: (end of the previous step, start of this one)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.device.type == "cuda" and self._last_end is not None:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((self._last_end, start))

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            self._last_end = torch.cuda.Event(enable_timing=True)
            self._last_end.record()

    def gpu_idle_seconds(self) -> float:
        """GPU idle time between the steps of this interval (waits for the last recorded event)."""
        if not self._events:
            return 0.0
        self._events[-1][1].synchronize()
        return sum(end.elapsed_time(start) for end, start in self._events) / 1e3

    def record_batches(self, batches: list, wait_seconds: float) -> None:
        """Called by the trainer with each optimizer step's batches and the seconds it waited for them."""
        self._wait += wait_seconds
        for batch in batches:
            self._lengths.append((batch["input_ids"].shape[-1], real_lengths(batch).detach()))

    def flops_per_token(self, seq_length: int) -> float:
        if seq_length not in self._flops_per_token:
            self._flops_per_token[seq_length] = model_flops_per_token(self.config, seq_length, "causal")
        return self._flops_per_token[seq_length]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.config = model.config
        self.device = args.device
        if self.peak_flops is None and self.device.type == "cuda":
            self.peak_flops = peak_flops_for_device(torch.cuda.get_device_name(self.device))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._last_end = None
        self._reset(time.perf_counter())

    def measure(self, world_size: int = 1) -> dict:
        """The figures since the last call (or train begin), and start a new interval."""
        now = time.perf_counter()
        elapsed = max(now - self._interval_start, 1e-9)
        total_tokens, real_tokens, flops = 0, 0, 0.0
        for width, lengths in self._lengths:
            lengths = lengths.tolist()  # one small copy per batch, at log time only
            total_tokens += width * len(lengths)
            real_tokens += sum(lengths)
            # The attention term depends on the sequence length: count each row at its own real length.
            flops += sum(length * self.flops_per_token(length) for length in lengths if length > 0)
        figures = {
            "tokens_per_second_per_device": total_tokens / elapsed,
            "tokens_per_second": total_tokens / elapsed * world_size,
            "real_tokens_per_second_per_device": real_tokens / elapsed,
            "real_tokens_per_second": real_tokens / elapsed * world_size,
            "tflops_per_device_causal": flops / elapsed / 1e12,
            "peak_memory_gb": peak_memory_gb(self.device),
            "data_wait_share": min(1.0, self._wait / elapsed),
        }
        if self.device.type == "cuda":
            figures["gpu_idle_share"] = min(1.0, self.gpu_idle_seconds() / elapsed)
        if self.peak_flops:
            figures["mfu_causal"] = flops / elapsed / self.peak_flops
        self._reset(now)
        return figures

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training logs only (they carry the loss); evaluation and the final summary are left alone.
        if logs is None or "loss" not in logs or self.config is None or not self._lengths:
            return
        figures = {key: float(f"{value:.4g}") for key, value in self.measure(args.world_size).items()}
        logs.update(figures)
        # Trainer.log appended a copy of the logs to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)
