"""From the per-process results of each path (one JSON per path and repeat) to the figures benchmark.py reports.

`aggregate(runs)`: over the runs that finished, the median of every numeric figure, the min and max of the
HEADLINE figures (`<key>_min`, `<key>_max`), the largest peak memory, and how many runs there were and
finished; a path none of whose runs finished reports the errors. `ratios(results)`: ours' median useful
tokens/s over each baseline's, and over the best baseline. `loss_difference(ours, other)`: the per-step loss
difference of two runs on the same data and seed (float8 against bf16). Pure functions of dicts.
"""

import statistics

BEST_BY = "real_tokens_per_second_per_device"
HEADLINE = (
    BEST_BY,
    "mfu_causal_at_seq_length",
    "mfu_palm",
    "model_tflops_causal",
    "hardware_tflops",
    "hfu",
    "seconds_per_step",
)
LARGEST = ("peak_memory_gb", "peak_allocated_gb", "peak_reserved_gb")
LISTS_KEPT = ("losses",)


def finished(run: dict) -> bool:
    return "error" not in run and bool(run.get(BEST_BY))


def aggregate(runs: list[dict]) -> dict:
    """Median (and min/max of HEADLINE) over the finished runs of one path (see the module's docstring)."""
    done = [run for run in runs if finished(run)]
    if not done:
        errors = [run.get("error", "no figures") for run in runs]
        return {"error": errors[-1] if errors else "not run", "errors": errors, "repeats": len(runs), "finished": 0}
    result = {}
    keys = [key for run in done for key in run]
    for key in dict.fromkeys(keys):
        values = [run[key] for run in done if key in run]
        numbers = [value for value in values if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if key in LISTS_KEPT:
            result[key] = values[0]
        elif numbers and len(numbers) == len(values):
            result[key] = max(numbers) if key in LARGEST else statistics.median(numbers)
            if key in HEADLINE:
                result[f"{key}_min"], result[f"{key}_max"] = min(numbers), max(numbers)
        else:
            result[key] = values[0]
    result.update(repeats=len(runs), finished=len(done))
    return result


def ratios(results: dict, ours: str = "ours", baselines=("plain", "flattening")) -> dict:
    """{"<baseline>": ours / baseline, ..., "best_baseline": name, "vs_best_baseline": ratio} of the median
    useful tokens/s, for the baselines that finished; {} when ours did not."""
    mine = results.get(ours, {}).get(BEST_BY)
    if not mine:
        return {}
    found = {name: results[name][BEST_BY] for name in baselines if results.get(name, {}).get(BEST_BY)}
    figures = {name: mine / value for name, value in found.items()}
    if found:
        best = max(found, key=found.get)
        figures.update(best_baseline=best, vs_best_baseline=mine / found[best])
    return figures


def loss_difference(reference: list[float], other: list[float]) -> dict | None:
    """Per-step loss difference of `other` against `reference` over the steps both ran; None without any."""
    pairs = list(zip(reference, other))
    if not pairs:
        return None
    differences = [b - a for a, b in pairs]
    return {
        "steps": len(pairs),
        "mean_abs": statistics.fmean(abs(d) for d in differences),
        "max_abs": max(abs(d) for d in differences),
        "last": differences[-1],
        "last_relative": differences[-1] / reference[len(pairs) - 1] if reference[len(pairs) - 1] else None,
        "reference_first_last": [reference[0], reference[len(pairs) - 1]],
    }
