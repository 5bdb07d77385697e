"""Where a training step's device time goes: one torch.profiler pass over a few steps after the warm-up.

`classify_kernel(name)` puts a kernel (CUDA) or operator (CPU) name into one of CLASSES by its name:
communication (NCCL, gloo, c10d), attention (flash, fmha, sdpa, flex), optimizer (multi_tensor_apply, Adam,
foreach), GEMM (cuBLAS/CUTLASS kernels: gemm, nvjet, xmma, wgmma, ..., aten::mm/addmm/bmm on a CPU), and
everything else elementwise_norm (elementwise, norms, softmax, the loss, copies and memsets). The checks
run in that order, since attention kernels are often CUTLASS kernels too.

`summarize(profiler, wall_seconds, device_type)` then splits the profiled wall time:
- CUDA: the kernels, memcpys and memsets of the trace, each class's summed duration; busy = the union of
  their intervals over all streams; idle = wall - busy (the device waited for the host: launches, syncs,
  the data loader, Python);
- CPU (the rehearsal): each operator's self time (nested operators are not counted twice); busy = their
  sum (at most the wall time), idle = the rest.
Cost: the profiler's overhead on the profiled steps only (they are not timed), and writing and reading one
chrome trace of them (a few MB for a few 3B steps).
"""

import json
import os
import tempfile
from collections import defaultdict

CLASSES = ("gemm", "attention", "elementwise_norm", "optimizer", "communication")
_RULES = (
    ("communication", ("nccl", "allreduce", "all_reduce", "reduce_scatter", "reducescatter", "allgather",
                       "all_gather", "c10d", "gloo")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "scaled_dot_product", "flex")),
    ("optimizer", ("multi_tensor_apply", "adam", "foreach", "optimizer")),
    ("gemm", ("gemm", "nvjet", "xmma", "wgmma", "cublas", "cutlass", "s16816", "s1688", "gemv", "splitk",
              "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::addmv", "aten::mv", "triton_tem_fused_mm", "triton_tem_fused_addmm", "triton_tem_fused_bmm")),
)  # fmt: skip
CPU_SKIPPED = ("ProfilerStep",)  # the profiler's own step markers span everything


def classify_kernel(name: str) -> str:
    """One of CLASSES for a CUDA kernel or CPU operator name (see the module's docstring)."""
    lowered = name.lower()
    for kind, markers in _RULES:
        if any(marker in lowered for marker in markers):
            return kind
    return "elementwise_norm"


def union_length(intervals) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def split_device_time(events, wall_ms: float, top: int = 20) -> dict:
    """events: (name, start_ms, duration_ms) per kernel. Milliseconds per class, busy (union), idle, shares of
    the wall time, and the `top` kernels by total time."""
    per_class, per_name, calls = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, _, duration in events:
        per_class[classify_kernel(name)] += duration
        per_name[name] += duration
        calls[name] += 1
    busy = min(union_length((start, start + duration) for _, start, duration in events), wall_ms)
    return split_figures(per_class, per_name, calls, busy, wall_ms, top)


def split_figures(per_class, per_name, calls, busy_ms: float, wall_ms: float, top: int) -> dict:
    milliseconds = {kind: per_class.get(kind, 0.0) for kind in CLASSES}
    idle = max(wall_ms - busy_ms, 0.0)
    wall = max(wall_ms, 1e-9)
    shares = {kind: value / wall for kind, value in milliseconds.items()}
    shares["idle"] = idle / wall
    kernels = sorted(per_name, key=per_name.get, reverse=True)[:top]
    return {
        "wall_ms": wall_ms,
        "busy_ms": busy_ms,
        "idle_ms": idle,
        "ms": milliseconds,
        "share_of_wall": shares,
        "top_kernels": [
            {"name": name[:160], "class": classify_kernel(name), "ms": per_name[name], "calls": calls[name]}
            for name in kernels
        ],
    }


def trace_events(profiler) -> list[tuple[str, float, float]]:
    """(name, start ms, duration ms) of the device work (kernels, memcpys, memsets) in a profile's trace."""
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        profiler.export_chrome_trace(path)
        with open(path) as trace:
            data = json.load(trace)
    finally:
        os.remove(path)
    events = data.get("traceEvents", data) if isinstance(data, dict) else data
    return [
        (event["name"], event["ts"] / 1e3, event["dur"] / 1e3)
        for event in events
        if event.get("ph") == "X" and event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event
    ]


def summarize(profiler, wall_seconds: float, device_type: str, steps: int) -> dict:
    """The device-time split of a finished torch.profiler.profile over `steps` steps of `wall_seconds`."""
    wall_ms = wall_seconds * 1e3
    if device_type == "cuda":
        figures = split_device_time(trace_events(profiler), wall_ms)
    else:
        per_class, per_name, calls = defaultdict(float), defaultdict(float), defaultdict(int)
        for event in profiler.key_averages():
            if event.key.startswith(CPU_SKIPPED):
                continue
            self_ms = event.self_cpu_time_total / 1e3
            per_class[classify_kernel(event.key)] += self_ms
            per_name[event.key] += self_ms
            calls[event.key] += event.count
        figures = split_figures(per_class, per_name, calls, min(sum(per_class.values()), wall_ms), wall_ms, 20)
    return {"device": device_type, "steps": steps, **figures}


def activities(device_type: str) -> list:
    import torch

    kinds = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        kinds.append(torch.profiler.ProfilerActivity.CUDA)
    return kinds
