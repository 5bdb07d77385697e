"""Training throughput of this project's path against the baselines transformers offers, on the same data.

    python scripts/benchmark.py --recipe recipes/starcoder2-3b/pretrain.yaml --synthetic 2000 \
        --deepspeed accelerate_configs/deepspeed/zero2.json --baselines plain,flattening
    python scripts/benchmark.py --recipe recipes/tiny/pretrain.yaml --seq_length 4096 --baseline --use_cpu true

Paths (benchmarking/paths.py): ours (the recipe as given, any `--key value` recipe override applied), plain
(`--baseline`: padded rows, sdpa, transformers' loss) and flattening (transformers' DataCollatorWithFlattening,
flash_attention_2 or sdpa with its packed mask), chosen with `--baselines plain,flattening`. The baselines share
the model, precision, optimizer, batch and DeepSpeed config with ours; `--plain key=value` and `--flattening
key=value` override their TrainingArguments. `--variant NAME="WORDS"` adds a path: ours with more words
(for example `--variant "float8=--float8 true"`); its per-step losses are compared with ours'.

Timing: every path and repeat runs in a process of its own, the paths alternating, `--repeats` times
(default 3). Each trains at least `--warmup` steps (default 10 on CUDA, 2 on a CPU) and on while a step still
compiles, then is timed for `--seconds` (default 60 on CUDA, 10 on a CPU), or exactly `--steps` steps. The
report gives per path the median and min–max of useful tokens/s, MFU (causal, and PaLM's k = seq_length),
hardware TFLOP/s counting recomputation, peak memory, data wait; and ours / each baseline. `--profile_steps N`
profiles N steps of ours after its first timed interval, in the same process (device time by GEMM, attention,
elementwise+norm, optimizer, communication, idle; a process of its own with `--repeats 0`), `--gemm` the GEMM
ceiling at the model's shapes; `--skip_ours` measures only the baselines and variants. With `--deepspeed
CONFIG` every path trains through DeepSpeed in a one-process distributed setup (on a CPU with DeepSpeed's CPU
accelerator).

Data: the recipe's dataset through the project's pipeline (needs the datasets library), `--token_file` (an
.npz written by `--save_token_file`), or `--synthetic N` documents of log-normal lengths. Results go to
`--output` (JSON), by default $OUT/benchmark-<label>.json when OUT is set, with the commit, date and command.
"""

import argparse
import os
import sys
import traceback

from starcoder2_train.cli import ScriptParser

BASELINES = ("plain", "flattening")  # benchmarking/paths.py's, not imported: the parent stays light


def baseline_list(text: str) -> list[str]:
    names = [] if text in ("", "none") else text.split(",")
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline {', '.join(unknown)}: choose among {', '.join(BASELINES)}")
    return names


def parse_args(argv):
    """(this script's options, the recipe's `--key value` overrides for every path, their grammar checked)."""
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--recipe", help="Recipe YAML; without it, give --model_config and --seq_length.")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps at least (10 on CUDA, 2 on a CPU).")
    parser.add_argument("--seconds", type=float, default=None, help="Timed interval (60 s on CUDA, 10 on a CPU).")
    parser.add_argument("--steps", type=int, default=None, help="Time exactly this many steps instead of --seconds.")
    parser.add_argument("--repeats", type=int, default=3, help="Processes per path, alternating the paths.")
    parser.add_flag("--baseline", help="Also measure the plain path (= --baselines plain).")
    parser.add_argument("--baselines", type=baseline_list, default=None, help="Comma-separated: plain,flattening.")
    parser.add_flag("--skip_ours", help="Only the baselines and variants, not ours.")
    parser.add_argument("--plain", action="append", default=[], metavar="KEY=VALUE", help="Plain path override.")
    parser.add_argument("--flattening", action="append", default=[], metavar="KEY=VALUE", help="Flattening override.")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="WORDS"', help="Ours with WORDS.")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="Model config override.")
    parser.add_argument("--profile_steps", type=int, default=0, help="Profile ours over this many steps, once.")
    parser.add_flag("--gemm", help="Also measure the GEMM ceiling at the model's shapes.")
    parser.add_argument("--token_file", help="Token rows from an .npz written by --save_token_file.")
    parser.add_argument("--synthetic", type=int, help="Use this many synthetic documents (log-normal lengths).")
    parser.add_argument("--save_token_file", help="Write the token rows used here to this .npz, for --token_file.")
    parser.add_argument("--max_tokens", type=int, default=None, help="Use only the first documents, up to this many.")
    parser.add_argument("--child_timeout", type=float, default=None, help="Kill a path's process after this long.")
    parser.add_argument("--label", default="benchmark", help="Name of this measurement in the output.")
    parser.add_argument("--output", help="Results JSON (default $OUT/benchmark-<label>.json if OUT is set).")
    # A child process: one path (ours, plain, flattening, a variant, or gemm), one repeat.
    parser.add_argument("--only_path", help=argparse.SUPPRESS)
    parser.add_argument("--repeat_index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_flag("--profile", help=argparse.SUPPRESS)
    return parser.parse_with_overrides(argv)


def main(argv=None):
    command_words = list(sys.argv[1:] if argv is None else argv)
    args, recipe_words = parse_args(command_words)
    # Imported after the parse: a mistyped word is refused before anything heavier than the standard library.
    from starcoder2_train.benchmarking.isolated import exit_on_sigterm
    from starcoder2_train.benchmarking.processes import on_cpu
    from starcoder2_train.benchmarking.provenance import write_json
    from starcoder2_train.benchmarking.runner import measure_paths

    exit_on_sigterm()
    cpu = on_cpu(recipe_words)
    args.warmup = args.warmup if args.warmup is not None else (2 if cpu else 10)
    args.seconds = args.seconds if args.seconds is not None else (10.0 if cpu else 60.0)
    if args.only_path:
        from starcoder2_train.benchmarking.child import measure_one  # torch, transformers' Trainer, the model

        try:
            written = measure_one(args, recipe_words)
        except Exception as error:  # a recipe the path cannot run: the parent reports why
            traceback.print_exc()
            error = f"{type(error).__name__}: {str(error)[:300]}"
            written = {"path": args.only_path, "repeat": args.repeat_index, "result": {"error": error}}
        write_json(args.output, written)
        return written
    args.baselines = args.baselines if args.baselines is not None else (["plain"] if args.baseline else [])
    if args.output is None and os.environ.get("OUT"):
        args.output = os.path.join(os.environ["OUT"], f"benchmark-{args.label}.json")
    return measure_paths(args, recipe_words, command_words, __file__)


if __name__ == "__main__":
    main()
