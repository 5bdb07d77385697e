"""The device check's plan: its steps, the words each runs with, the time each is given, and memory_peaks.json.

`plan(settings)` lists the steps in the order they run, each with the seconds planned on one H200 (PLANNED) and
a hard limit. `run_plan` runs them in turn, each in its own process (isolated.py), starting a step only while
its planned seconds still fit in the budget; every benchmark step trains through DeepSpeed ZeRO-2 (the 3B
recipes' config) with the recipe's own training keys (micro batch, accumulation, checkpointing, loss keys: read
from the recipe by benchmark.py at run time), with shorter timing than a full benchmark (TIMING). After each
step it rewrites device_check.json and memory_peaks.json:

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

from starcoder2_train.benchmarking.isolated import run_benchmark, run_limited
from starcoder2_train.benchmarking.kernels import attention_words, choose_kernel, read_kernels
from starcoder2_train.benchmarking.provenance import PROJECT_ROOT, commit, write_json
from starcoder2_train.model.presets import MODEL_PRESETS

RECIPE_4K = "recipes/starcoder2-3b/pretrain.yaml"
RECIPE_16K = "recipes/starcoder2-3b/long_context.yaml"
ZERO = "accelerate_configs/deepspeed/zero2.json"  # the 3B recipes launch with deepspeed_zero2.yaml
# Seconds planned on one H200 for each step (process starts, DeepSpeed init, compilation included), and the
# limit after which the step is killed. Sum of the plan: 440 s, inside the 450 s default budget.
PLANNED = {"kernels": 50, "4k": 140, "16k": 100, "profile-4k": 45, "dropout-4k": 50, "float8": 55}
LIMITS = {"kernels": 90, "4k": 210, "16k": 150, "profile-4k": 80, "dropout-4k": 80, "float8": 90}
TINY_PLANNED = {"kernels": 40, "4k": 60, "16k": 45, "profile-4k": 25, "dropout-4k": 25, "float8": 40}
TIMING = {"warmup": 5, "seconds": 10.0, "repeats": 1}  # per path; a full benchmark: 10, 60 s, 3
TINY_TIMING = {"warmup": 2, "seconds": 2.0, "repeats": 1}
FLOAT8_STEPS = 20  # optimizer steps of the loss-parity run, bf16 then float8, same data and seed
NO_CHECKPOINT_REENTRANT = '{"use_reentrant": false}'
# The tiny rehearsal: the 3B recipes' keys on the tiny model, short sequences, fp32, no compilation, the CPU.
TINY_WORDS = ["--model_config", "tiny", "--bf16", "false", "--compile_layers", "false"]
TINY_WORDS += ["--dataloader_num_workers", "0", "--use_cpu", "true"]


@dataclasses.dataclass
class Settings:
    output_dir: str
    tiny: bool = False
    token_file: str | None = None
    budget_seconds: float = 450.0


@dataclasses.dataclass
class Step:
    name: str
    planned: float
    limit: float
    words: list[str] | None = None  # benchmark.py words; None: the kernels step


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
    """The benchmark steps, given the attention kernels measured (the first step)."""
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
    sixteen_k_paths = ["--baselines", "flattening", *flattening_checkpointing]
    float8 = [*four_k, "--config", f"num_hidden_layers={2 if settings.tiny else 4}"]
    float8 += ["--learning_rate", "3e-4", "--warmup_steps", "0", "--lr_scheduler_type", "constant"]
    float8 += ["--lr_scheduler_kwargs", "{}", "--variant", "float8=--float8 true"]
    float8_timing = {"warmup": 1, "steps": FLOAT8_STEPS, "repeats": 1}
    profile_timing = {"warmup": 3 if not settings.tiny else 1, "repeats": 0, "profile_steps": 3}
    words = {
        "4k": benchmark_words(settings, RECIPE_4K, [*four_k, "--baselines", "plain,flattening"]),
        "16k": benchmark_words(settings, RECIPE_16K, [*sixteen_k, *sixteen_k_paths]),
        "profile-4k": benchmark_words(settings, RECIPE_4K, four_k, profile_timing),
        "dropout-4k": benchmark_words(settings, RECIPE_4K, dropout_words),
        "float8": benchmark_words(settings, RECIPE_4K, float8, float8_timing),
    }
    return [Step(name, planned[name], LIMITS[name], words[name]) for name in words]


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
            case = {
                "name": f"{report['label']}-{path}",
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
    begun = time.perf_counter()
    status = run_kernels_step(settings, min(LIMITS["kernels"], remaining()), script)
    summary["steps"].append({"label": "kernels", "status": status, "seconds": round(time.perf_counter() - begun, 1)})
    kernels = read_kernels(os.path.join(settings.output_dir, "attention_kernels.json"))
    summary["chosen_attention"] = choose_kernel(kernels, preset_dropout(settings.tiny))
    save(summary)
    for step in plan(settings, kernels):
        if remaining() < step.planned:
            summary["steps"].append({"label": step.name, "skipped": f"{remaining():.0f} s of the budget left"})
            continue
        report = run_benchmark(
            benchmark_script, step.name, step.words, min(step.limit, remaining()), settings.output_dir
        )
        report["planned_seconds"] = step.planned
        summary["steps"].append(report)
        reports.append(report)
        write_memory_peaks(os.path.join(settings.output_dir, "memory_peaks.json"), reports, settings.tiny)
        save(summary)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary
