"""The device check's plan: its steps, the words each runs with, the time each is given, and memory_peaks.json.

`plan(settings)` lists the steps in the order they run, each with the seconds planned on one H100 or H200
(PLANNED) and a hard limit (LIMITS): the kernels step, then the steps that matter (CORE: 4k ours with its
profile against flattening, 16k ours), then the optional ones (OPTIONAL: the plain padded path at 4k, the other
attention dropout, float8 loss parity, flattening at 16k). `run_plan` runs them in turn, each in its own process
(isolated.py), starting a step only while its planned seconds still fit in the budget (a step that does not fit
is skipped and the next, smaller one may still run); every benchmark step trains through DeepSpeed ZeRO-2 (the
3B recipes' config) with the recipe's own training keys (micro batch, accumulation, checkpointing, loss keys:
read from the recipe by benchmark.py at run time), with shorter timing than a full benchmark (TIMING). After
each step it rewrites device_check.json and memory_peaks.json:

    {"commit", "device", "date", "torch", "memory": what peak_allocated_gb measures,
     "cases": [{"name", "recipe", "overrides", "world_size", "zero_config", "attention", "loss_kernel",
                "checkpointed_layers", "peak_allocated_gb", "path", "config_overrides", "seq_length", ...}]}

`overrides` are the recipe words of the case (what `run_pretrain.py RECIPE OVERRIDES` would be given), without
the benchmark's own options; `loss_kernel` and `checkpointed_layers` are what `auto` resolved to; `path` is
ours, plain, flattening or a variant (the baselines train with transformers' collators, not the recipe's);
`config_overrides` are model-config changes that no recipe key expresses. A case whose process failed (out of
memory) has its `error` and the peak reached before it.
"""

import dataclasses
import os
import sys
import time

import yaml

from starcoder2_train.benchmarking.aggregate import ratios
from starcoder2_train.benchmarking.isolated import run_benchmark, run_limited
from starcoder2_train.benchmarking.kernels import attention_words, choose_kernel, read_kernels
from starcoder2_train.benchmarking.provenance import PROJECT_ROOT, commit, write_json
from starcoder2_train.model.presets import MODEL_PRESETS

RECIPE_4K = "recipes/starcoder2-3b/pretrain.yaml"
RECIPE_16K = "recipes/starcoder2-3b/long_context.yaml"
ZERO = "accelerate_configs/deepspeed/zero2.json"  # the 3B recipes launch with deepspeed_zero2.yaml
CORE = ("4k", "16k")  # after the kernels step: what the device check is for
OPTIONAL = ("4k-plain", "dropout-4k", "float8", "16k-flattening")  # only while the budget allows
BUDGET_SECONDS = 290.0  # the device command's `timeout 300` leaves 10 s to write the summary and the table
# Timing per path: at least 3 warm-up steps, and on while a step still compiles (up to 19), then 6 s timed
# (about 6 optimizer steps of 16,384 tokens at 4k and 16k). A full benchmark takes 10 steps, 60 s, 3 repeats.
# 6 s is enough for what the device check decides: the time of an optimizer step whose shapes do not change
# varies by about 1% from step to step on one GPU (the 4 timed steps of commit beef66e), far inside the
# margins the figures are read against (ours / baseline >= 1.3, MFU >= 45-50%), and no compilation falls in
# the interval (compiled_during_timing says so).
TIMING = {"warmup": 3, "seconds": 6.0, "repeats": 1}
TINY_TIMING = {"warmup": 2, "seconds": 2.0, "repeats": 1}
PROFILE_STEPS = 3  # profiled after 4k ours' timed interval, in the same process
FLOAT8_STEPS = 20  # optimizer steps of the loss-parity run, bf16 then float8, same data and seed
FLOAT8_LAYERS = 4
# The parts a step's seconds are made of, on one H100 or H200. Measured at commit beef66e on one H100 (no
# DeepSpeed then): a path process that started, built 3B and ran 6 steps took about 16 s, 7 s of them steps;
# the layers' compilation added about 25 s. Not measured yet: DeepSpeed's import and ZeRO-2 init of 3B.
PARTS = {
    "parent": 3,  # benchmark.py's parent: python and torch imported, the children started
    "process_start": 8,  # a path's process: torch, transformers' Trainer and deepspeed imported, documents read
    "build": 4,  # StarCoder2-3B from scratch on the GPU, fp32 (the 4-layer float8 model: 1)
    "deepspeed_init": 10,  # the ZeRO-2 engine: bf16 weights, fp32 master weights and Adam state of 3B
    "compile": 30,  # the decoder layer's graph, forward and backward, compiled once per process (compile_layers)
    "profile": 11,  # PROFILE_STEPS steps under the profiler (about twice as slow) and the trace's summary
}
# Seconds per optimizer step (micro batch x accumulation = 16,384 tokens at 4k and at 16k): about 16,000 tokens/s
# for ours at beef66e; the baselines slower (plain 4k: 1.34 s then; flattening at 16k checkpoints every layer).
STEP_SECONDS = {"ours-4k": 1.0, "ours-16k": 1.2, "flattening-4k": 1.1, "plain-4k": 1.3, "flattening-16k": 1.8}


def path_seconds(step_seconds: float, compiled: bool, steps: int | None = None, build: float = PARTS["build"]):
    """One path process: start, model build, DeepSpeed init, one compilation if compiled, then the warm-up steps
    and the timed interval (or `steps` steps)."""
    fixed = PARTS["process_start"] + build + PARTS["deepspeed_init"] + (PARTS["compile"] if compiled else 0)
    running = TIMING["warmup"] * step_seconds + (TIMING["seconds"] if steps is None else steps * step_seconds)
    return fixed + running


def planned_seconds() -> dict:
    """Each step's planned seconds from PARTS and STEP_SECONDS (the kernels step: 46 s at beef66e, plus the
    dropout gradient check)."""
    float8_path = path_seconds(0.15, compiled=False, steps=FLOAT8_STEPS, build=1)  # 4 layers: ~0.15 s a step
    seconds = {
        "kernels": 60,
        "4k": PARTS["parent"]
        + path_seconds(STEP_SECONDS["ours-4k"], True)
        + PARTS["profile"]
        + path_seconds(STEP_SECONDS["flattening-4k"], False),
        "16k": PARTS["parent"] + path_seconds(STEP_SECONDS["ours-16k"], True),
        "4k-plain": PARTS["parent"] + path_seconds(STEP_SECONDS["plain-4k"], False),
        "dropout-4k": PARTS["parent"] + path_seconds(STEP_SECONDS["ours-4k"], True),
        "float8": PARTS["parent"] + 2 * float8_path,  # bf16 then float8, uncompiled: parity, not speed
        "16k-flattening": PARTS["parent"] + path_seconds(STEP_SECONDS["flattening-16k"], False),
    }
    return {name: round(value) for name, value in seconds.items()}


PLANNED = planned_seconds()
# Killed after: planned + one more compilation where a process compiles (a second one survives) + 15 s.
COMPILING = {"4k": 1, "16k": 1, "dropout-4k": 1}
LIMITS = {name: PLANNED[name] + PARTS["compile"] * COMPILING.get(name, 0) + 15 for name in PLANNED}
LIMITS["kernels"] = 100
TINY_PLANNED = {
    "kernels": 40,
    "4k": 60,
    "16k": 30,
    "4k-plain": 25,
    "dropout-4k": 25,
    "float8": 40,
    "16k-flattening": 25,
}
NO_CHECKPOINT_REENTRANT = '{"use_reentrant": false}'
# The tiny rehearsal: the 3B recipes' keys on the tiny model, short sequences, fp32, no compilation, the CPU.
TINY_WORDS = ["--model_config", "tiny", "--bf16", "false", "--compile_layers", "false"]
TINY_WORDS += ["--dataloader_num_workers", "0", "--use_cpu", "true"]


@dataclasses.dataclass
class Settings:
    output_dir: str
    tiny: bool = False
    token_file: str | None = None
    budget_seconds: float = BUDGET_SECONDS


@dataclasses.dataclass
class Step:
    name: str
    planned: float
    limit: float
    words: list[str] | None = None  # benchmark.py words; None: the kernels step
    optional: bool = False


def preset_dropout(tiny: bool) -> float:
    return MODEL_PRESETS["tiny" if tiny else "starcoder2-3b"]["attention_dropout"]


def recipe_value(recipe: str, key: str):
    with open(os.path.join(PROJECT_ROOT, recipe)) as handle:
        return (yaml.safe_load(handle) or {}).get(key)


def case_overrides(case: str, attention: str, tiny: bool) -> list[str]:
    """The recipe words of a case: DeepSpeed ZeRO-2 (the 3B recipes' config), the chosen attention, from-scratch
    weights at 16k; and the tiny model's words in a rehearsal."""
    words = ["--deepspeed", ZERO, *attention_words(attention)]
    if case == "16k" and not tiny:
        words = ["--model_config", "starcoder2-3b", *words]
    if tiny:
        words += [*TINY_WORDS, "--seq_length", "512" if case == "16k" else "256"]
    return words


def benchmark_words(settings: Settings, recipe: str, overrides: list[str], timing=None) -> list[str]:
    timing = timing or (TINY_TIMING if settings.tiny else TIMING)
    data = (
        ["--token_file", settings.token_file]
        if settings.token_file
        else ["--synthetic", "300" if settings.tiny else "2000"]
    )
    words = ["--recipe", recipe, *data]
    for key, value in timing.items():
        words += [f"--{key}", str(value)]
    return words + overrides


def plan(settings: Settings, kernels: list[dict]) -> list[Step]:
    """The benchmark steps, given the attention kernels measured (the first step): CORE, then OPTIONAL."""
    planned = TINY_PLANNED if settings.tiny else PLANNED
    dropout = preset_dropout(settings.tiny)
    other_dropout = 0.0 if dropout else 0.1
    chosen = choose_kernel(kernels, dropout)
    four_k = case_overrides("4k", chosen, settings.tiny)
    sixteen_k = case_overrides("16k", chosen, settings.tiny)
    flattening_checkpointing = ["--flattening", "gradient_checkpointing=true"]
    flattening_checkpointing += ["--flattening", f"gradient_checkpointing_kwargs={NO_CHECKPOINT_REENTRANT}"]
    dropout_words = case_overrides("4k", choose_kernel(kernels, other_dropout), settings.tiny)
    dropout_words += ["--config", f"attention_dropout={other_dropout}"]
    float8 = [*four_k, "--config", f"num_hidden_layers={2 if settings.tiny else FLOAT8_LAYERS}"]
    float8 += ["--compile_layers", "false"]  # loss parity: the same numbers compiled or not, minus a compilation
    float8 += ["--learning_rate", "3e-4", "--warmup_steps", "0", "--lr_scheduler_type", "constant"]
    float8 += ["--lr_scheduler_kwargs", "{}", "--variant", "float8=--float8 true"]
    float8_timing = {"warmup": 1, "steps": 4 if settings.tiny else FLOAT8_STEPS, "repeats": 1}  # a CPU refuses float8
    profiled = {**(TINY_TIMING if settings.tiny else TIMING), "profile_steps": 1 if settings.tiny else PROFILE_STEPS}
    words = {
        "4k": benchmark_words(settings, RECIPE_4K, [*four_k, "--baselines", "flattening"], profiled),
        "16k": benchmark_words(settings, RECIPE_16K, sixteen_k),
        "4k-plain": benchmark_words(settings, RECIPE_4K, [*four_k, "--skip_ours", "--baselines", "plain"]),
        "dropout-4k": benchmark_words(settings, RECIPE_4K, dropout_words),
        "float8": benchmark_words(settings, RECIPE_4K, float8, float8_timing),
        "16k-flattening": benchmark_words(
            settings, RECIPE_16K, [*sixteen_k, "--skip_ours", "--baselines", "flattening", *flattening_checkpointing]
        ),
    }
    return [Step(name, planned[name], LIMITS[name], words[name], name in OPTIONAL) for name in (*CORE, *OPTIONAL)]


def memory_cases(reports: list[dict]) -> list[dict]:
    """One memory_peaks.json case per path process of the benchmark reports (the largest peak of its repeats)."""
    cases = []
    for report in reports:
        for path, runs in (report.get("all_repeats") or {}).items():
            peaks = [run.get("peak_allocated_gb", run.get("peak_memory_gb")) for run in runs]
            peaks = [peak for peak in peaks if peak is not None]
            if not peaks:
                continue
            errors = [run["error"] for run in runs if "error" in run]
            own = (report.get("path_recipe_overrides") or {}).get(path)
            overrides = list(own or report.get("recipe_overrides") or [])
            label = report["label"]
            case = {
                "name": label if label.endswith(f"-{path}") else f"{label}-{path}",
                "recipe": report.get("recipe"),
                "overrides": overrides,
                "world_size": 1,
                "zero_config": ZERO if ZERO in overrides else None,
                "attention": next((run.get("attention") for run in runs if run.get("attention")), None),
                "loss_kernel": next((run.get("loss_kernel") for run in runs if run.get("loss_kernel")), None),
                "checkpointed_layers": next(
                    (r["checkpointed_layers"] for r in runs if "checkpointed_layers" in r), None
                ),
                "peak_allocated_gb": float(max(peaks)),
                "path": path,
                "config_overrides": list(report.get("config_overrides") or []),
                "seq_length": report.get("seq_length"),
                "micro_batch": report.get("micro_batch"),
            }
            if path in (report.get("path_details") or {}) and report["path_details"][path]:
                case["path_details"] = report["path_details"][path]
            if errors:
                case["error"] = errors[-1]
            cases.append(case)
    return cases


def write_memory_peaks(path: str, reports: list[dict], tiny: bool) -> dict:
    device = next((report["machine"] for report in reports if report.get("machine")), None)
    memory = "peak resident set of the process (CPU)" if tiny else "torch.cuda.max_memory_allocated of the process"
    first = next((report for report in reports if report.get("date")), {})
    peaks = {"commit": commit(), "device": device, "date": first.get("date"), "torch": first.get("torch")}
    peaks.update(memory=memory, cases=memory_cases(reports))
    write_json(path, peaks)
    return peaks


def cross_step_ratios(reports: list[dict]) -> dict:
    """Ours' useful tokens/s over each baseline's at 4k and 16k, the baselines measured in the core step or in an
    optional one (4k-plain, 16k-flattening)."""
    figures = {}
    for case in CORE:
        results = {}
        for report in reports:
            if report.get("label") == case or report.get("label", "").startswith(f"{case}-"):
                results.update({path: result for path, result in (report.get("results") or {}).items()})
        found = ratios(results)
        if found:
            figures[case] = found
    return figures


def run_kernels_step(settings: Settings, limit: float, script: str) -> str:
    command = [sys.executable, script, "--kernels_only", "--output_dir", settings.output_dir]
    command += ["--token_file", settings.token_file] if settings.token_file else []
    command += ["--tiny"] if settings.tiny else []
    print(f"=== kernels (limit {limit:.0f} s)\n$ {' '.join(command)}", flush=True)
    return run_limited(command, limit)


def run_plan(settings: Settings, script: str, benchmark_script: str, summary: dict, save) -> dict:
    """Run every step that fits the budget; `save(summary)` after each one. Returns the summary."""
    start = time.perf_counter()

    def remaining() -> float:
        return settings.budget_seconds - (time.perf_counter() - start)

    planned = TINY_PLANNED if settings.tiny else PLANNED
    summary["steps"], reports = [], []
    summary["planned_seconds"], summary["timing"] = planned, TINY_TIMING if settings.tiny else TIMING
    summary["plan"] = {"core": CORE, "optional": OPTIONAL, "parts": PARTS, "step_seconds": STEP_SECONDS}
    begun = time.perf_counter()
    status = run_kernels_step(settings, min(LIMITS["kernels"], remaining()), script)
    summary["steps"].append({"label": "kernels", "status": status, "seconds": round(time.perf_counter() - begun, 1)})
    kernels = read_kernels(os.path.join(settings.output_dir, "attention_kernels.json"))
    summary["chosen_attention"] = choose_kernel(kernels, preset_dropout(settings.tiny))
    save(summary)
    for step in plan(settings, kernels):
        if remaining() < step.planned:
            left = f"{remaining():.0f} s of the budget left, {step.planned:.0f} planned"
            summary["steps"].append({"label": step.name, "optional": step.optional, "skipped": left})
            continue
        report = run_benchmark(
            benchmark_script, step.name, step.words, min(step.limit, remaining()), settings.output_dir
        )
        report.update(planned_seconds=step.planned, optional=step.optional)
        summary["steps"].append(report)
        reports.append(report)
        summary["ratios"] = cross_step_ratios(reports)
        write_memory_peaks(os.path.join(settings.output_dir, "memory_peaks.json"), reports, settings.tiny)
        save(summary)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary
