"""Training throughput of this project's path, and of the plain path a user would otherwise write, on the same data.

    python scripts/benchmark.py --recipe recipes/tiny/pretrain.yaml --seq_length 4096 --baseline
    python scripts/benchmark.py --model_config starcoder2-3b --seq_length 16384 --token_file F.npz --baseline \
        --bf16 true --attn_implementation sdpa_varlen --loss_chunk_size 4096 --plain gradient_checkpointing=true

Each path trains `--warmup` steps, then `--steps` timed steps, with the Trainer, and reports tokens/s per device
(all and non-padding "useful" tokens), model TFLOP/s and MFU (causal convention, model/flops.py), peak memory
and the share of time spent waiting for data (training/throughput.py's ThroughputCallback measures both paths
alike). The code is in starcoder2_train.benchmarking: documents, paths, steps, report, provenance.

- ours: the recipe as given (any `--key value` recipe override applies): packed windows with per-document
  positions, the recipe's attention, loss_chunk_size, checkpointing and compile keys.
- plain (`--baseline`): what one writes with transformers alone: one row per document, split into pieces of
  at most seq_length tokens (nothing dropped, as tokenizing with return_overflowing_tokens gives), rows in
  random order, padded to the longest row of the batch with an attention_mask, default attention (sdpa),
  transformers' own loss and default optimizer. It shares the model, seq_length, batch size, accumulation,
  precision and optimizer hyperparameters; `--plain key=value` overrides its TrainingArguments (for example
  gradient_checkpointing=true where it would not fit otherwise).

Data: the recipe's dataset through the project's pipeline (needs the datasets library), or `--token_file` (an
.npz written by `--save_token_file`: token rows without any preprocessing, so only torch and transformers are
needed), or `--synthetic N` documents of log-normal lengths. Results go to `--output` (JSON), by default
$OUT/benchmark-<label>.json when OUT is set, with the commit, date and command that produced it; the table is
printed last. An out-of-memory path is reported as such and the other still runs.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

from starcoder2_train.benchmarking.documents import describe, first_documents, load_documents, save_token_file
from starcoder2_train.benchmarking.paths import ours_path, plain_path
from starcoder2_train.benchmarking.provenance import run_record, write_json
from starcoder2_train.benchmarking.report import print_table
from starcoder2_train.benchmarking.steps import run_paths, useful_tokens_ratio
from starcoder2_train.model.factory import choose_attention
from starcoder2_train.model.flops import model_flops_per_token
from starcoder2_train.model.presets import build_config
from starcoder2_train.recipe import RecipeParser


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="Recipe YAML; without it, give --model_config and --seq_length.")
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per path.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed optimizer steps first (compilation, caches).")
    parser.add_argument("--baseline", action="store_true", help="Also measure the plain path, on the same data.")
    parser.add_argument("--only_baseline", action="store_true", help="Measure the plain path alone.")
    parser.add_argument(
        "--plain",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="TrainingArguments override for the plain path (repeatable).",
    )
    parser.add_argument("--token_file", help="Token rows from an .npz written by --save_token_file.")
    parser.add_argument("--synthetic", type=int, help="Use this many synthetic documents (log-normal lengths).")
    parser.add_argument("--save_token_file", help="Write the token rows used here to this .npz, for --token_file.")
    parser.add_argument(
        "--max_tokens", type=int, default=None, help="Use only the first documents, up to this many tokens."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Run each path this many times, alternating; report each one's best (shared machines).",
    )
    parser.add_argument("--label", default="benchmark", help="Name of this measurement in the output.")
    parser.add_argument("--output", help="Results JSON (default $OUT/benchmark-<label>.json if OUT is set).")
    return parser.parse_known_args(argv)


def main(argv=None):
    command_words = list(sys.argv[1:] if argv is None else argv)
    args, recipe_argv = parse_args(command_words)
    total_steps = args.warmup + args.steps
    output_dir = tempfile.mkdtemp(prefix="benchmark-")  # the Trainer's; nothing is saved there
    forced = {
        "output_dir": output_dir,
        "max_steps": total_steps,
        "logging_steps": total_steps,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "push_to_hub": "false",
        "disable_tqdm": "true",
    }
    forced = [word for key, value in forced.items() for word in (f"--{key}", str(value))]
    if args.recipe:
        words = [args.recipe, *recipe_argv, *forced]
    else:  # a named size: the data comes from --token_file or --synthetic
        words = ["--dataset_name_or_path", "(benchmark data)", *recipe_argv, *forced]
    model_args, data_args, training_args = RecipeParser().parse(words)
    if training_args.dataloader_num_workers:
        print("note: dataloader_num_workers is kept from the recipe for both paths", flush=True)

    documents, special, vocab_needed, source = load_documents(
        model_args, data_args, training_args, token_file=args.token_file, synthetic=args.synthetic
    )
    if args.max_tokens:
        documents = first_documents(documents, args.max_tokens)
    if args.save_token_file:
        save_token_file(args.save_token_file, documents, special)
        print(f"wrote {len(documents)} documents to {args.save_token_file}", flush=True)
    config = build_config(model_args, vocab_needed)
    seq_length = data_args.seq_length
    attention = choose_attention(model_args.attn_implementation)

    report = {
        "label": args.label,
        **run_record(command_words, __file__),
        "model": model_args.model_config or model_args.model_name_or_path,
        "seq_length": seq_length,
        "micro_batch": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "bf16": training_args.bf16,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "flops_per_token_causal_at_seq_length": model_flops_per_token(config, seq_length),
        "data": {"source": source, **describe(documents, seq_length)},
        "results": {},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "results"}), flush=True)

    paths = {}
    if not args.only_baseline:
        paths["ours"] = ours_path(model_args, data_args, training_args, attention, documents, special)
        report["packing_efficiency"] = paths["ours"].dataset.efficiency
    if args.baseline or args.only_baseline:
        paths["plain"] = plain_path(
            model_args, training_args, args.plain, output_dir, documents, seq_length, special.eos
        )
    report["results"], runs = run_paths(paths, config, args.warmup, args.steps, args.repeats)
    if args.repeats > 1:
        report["all_repeats"] = runs
    ratio = useful_tokens_ratio(report["results"])
    if ratio:
        report["useful_tokens_per_second_ratio"] = ratio

    output = args.output
    if output is None and os.environ.get("OUT"):
        output = os.path.join(os.environ["OUT"], f"benchmark-{args.label}.json")
    if output:
        write_json(output, report)
    shutil.rmtree(output_dir, ignore_errors=True)
    print_table(report)
    return report


if __name__ == "__main__":
    main()
