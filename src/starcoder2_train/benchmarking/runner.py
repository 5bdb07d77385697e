"""The parent of benchmark.py: one process per path and repeat (child.py runs each), then the report.

The parent touches no GPU and imports little: it starts the children (processes.py) in turns, ours, the
baselines, the variants, then again for each repeat, collects their JSON, aggregates them (aggregate.py:
median and min–max) and writes the report after every child, so that a benchmark stopped at a time limit
leaves what it measured. The profile (`--profile_steps`) is taken in ours' first process after its timed
interval (steps.py); only where ours has no timed process (`--repeats 0`) is it a profiled process of its own.
`--skip_ours` measures the baselines and variants alone (ours was measured in another benchmark). Then, if
asked, one GEMM benchmark process.
"""

import os
import shlex
import shutil
import tempfile

from starcoder2_train.benchmarking import aggregate, processes
from starcoder2_train.benchmarking.provenance import run_record, write_json
from starcoder2_train.benchmarking.report import print_table


def child_words(args, recipe_words: list[str]) -> list[str]:
    """What every child gets: the recipe words and the benchmark's data, timing and path options."""
    words = ["--recipe", args.recipe] if args.recipe else []
    for option in ("token_file", "synthetic", "max_tokens", "warmup", "seconds", "steps", "profile_steps"):
        value = getattr(args, option)
        if value is not None:
            words += [f"--{option}", str(value)]
    for option in ("plain", "flattening", "config", "variant"):
        for item in getattr(args, option):
            words += [f"--{option}", item]
    return words + recipe_words


def variant_words(variants: list[str]) -> dict[str, list[str]]:
    """`NAME=WORDS` items into {NAME: [words]} (WORDS split as a shell would)."""
    return {item.partition("=")[0]: shlex.split(item.partition("=")[2]) for item in variants}


def measure_paths(args, recipe_words: list[str], command_words: list[str], script: str) -> dict:
    """The parent (see the module's docstring); returns the report it wrote to `args.output`."""
    baselines = list(args.baselines)
    variants = variant_words(args.variant)
    names = ([] if getattr(args, "skip_ours", False) else ["ours"]) + [*baselines, *variants]
    env = processes.child_environment(processes.uses_deepspeed(recipe_words), processes.on_cpu(recipe_words))
    common = child_words(args, recipe_words)
    runs, contexts, statuses = {name: [] for name in names}, {}, []
    report = {"label": args.label, "paths": names, "repeats": args.repeats, "results": {}}
    work = tempfile.mkdtemp(prefix="benchmark-children-")

    def child(name: str, repeat: int, extra: list[str]) -> dict:
        output = os.path.join(work, f"{name}-{repeat}.json")
        words = [*common, "--only_path", name, "--repeat_index", str(repeat), *extra]
        written = processes.run_child(script, words, output, env, args.child_timeout)
        statuses.append(
            {"path": name, "repeat": repeat, "status": written["status"], "seconds": written["process_seconds"]}
        )
        contexts.setdefault(name, written.get("context"))
        return written.get("result", {"error": "no result"})

    def update() -> None:
        results = {name: aggregate.aggregate(runs[name]) for name in names if runs[name]}
        ours = contexts.get("ours") or next((c for c in contexts.values() if c), {})
        report.update({k: v for k, v in (ours or {}).items() if k not in ("path_details",)})
        report.update(results=results, all_repeats=runs, processes=statuses)
        report["path_details"] = {name: (c or {}).get("path_details") for name, c in contexts.items()}
        report["path_recipe_overrides"] = {name: (c or {}).get("recipe_overrides") for name, c in contexts.items()}
        report["useful_tokens_per_second_ratio"] = aggregate.ratios(results, baselines=baselines)
        report["loss_difference"] = {}
        for name in variants:
            if runs.get("ours") and runs.get(name):
                ours_run, other = runs["ours"][0], runs[name][0]
                difference = aggregate.loss_difference(ours_run.get("losses", []), other.get("losses", []))
                if difference is not None:  # float8_layers: 0 when the Trainer did not convert any layer
                    difference["float8_layers"] = other.get("float8_layers")
                report["loss_difference"][name] = difference
        if args.output:
            write_json(args.output, report)

    for repeat in range(args.repeats):
        for name in names:
            first = repeat == 0 and name == names[0]
            extra = ["--save_token_file", args.save_token_file] if first and args.save_token_file else []
            extra += variants.get(name, [])
            result = child(name, repeat, extra)
            if "profile" in result:  # ours' first process profiled steps after its timed interval
                report["profile"] = {"profile": result.pop("profile")}
            runs[name].append(result)
            update()
    if args.profile_steps and "profile" not in report and "ours" in names:
        report["profile"] = child("ours", args.repeats, ["--profile"])
        update()
    if args.gemm:
        report["gemm"] = child("gemm", 0, [])
        update()
    # The record last: reading the GPU's name starts CUDA in this process, which must not hold device
    # memory while the children measure.
    report = {**run_record(command_words, script), **report}
    update()
    shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    return report
