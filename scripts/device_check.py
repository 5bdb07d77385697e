"""The device check: StarCoder2-3B, full-parameter bf16 training, at 4k and 16k context, this project's path
against the plain path, in under 5 minutes on one H100. Figures go to $OUT (or --output_dir).

    python scripts/device_check.py --token_file outputs/benchmark/code_tokens.npz      # one H100
    python scripts/device_check.py --tiny                                              # the same steps on a CPU

Steps, each in its own process under a time limit (a failure or an out-of-memory is recorded and the next
step runs; steps that no longer fit the time budget are skipped and said to be):
1. attention kernels at 4k and 16k on the documents of the data, 3B's shapes (24 query heads, 2 key/value
   heads, head size 128, window 4096), bf16, forward + backward: sdpa_varlen, sdpa_blocked, flex_attention
   and transformers' sdpa with its per-document mask (the reference). Each is checked against the reference
   and timed; the fastest correct one that supports the model's attention dropout is used below.
2. 4k: ours (micro batch 1, 4 accumulation steps; the full logits fit, so no chunked loss) against the plain
   path (benchmark.py --baseline).
3. 16k: ours (micro batch 1, chunked loss, gradient checkpointing on the first 14 of 30 layers, retried with
   every layer if it does not fit) against the plain path (gradient checkpointing on every layer: it does not
   fit without).
4. if time is left: 4k ours with compile_layers.
Writes device_check.json (everything) and one JSON per benchmark, each with the commit, date and command that
produced it; prints a table last. The steps' code is in starcoder2_train.benchmarking (kernels, isolated).
"""

import argparse
import os
import sys
import time

from starcoder2_train.benchmarking.isolated import run_benchmark, run_limited
from starcoder2_train.benchmarking.kernels import choose_kernel, kernel_check, read_kernels
from starcoder2_train.benchmarking.provenance import run_record, write_json
from starcoder2_train.benchmarking.report import print_summary

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARK = os.path.join(HERE, "benchmark.py")  # started as a command of its own, never imported
USE_REENTRANT_FALSE = '{"use_reentrant": false}'


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token_file", help="Token rows (.npz from benchmark.py --save_token_file); else synthetic.")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny model, short sequences, few steps.")
    parser.add_argument("--budget_seconds", type=float, default=285.0, help="Stop starting steps after this long.")
    parser.add_argument("--output_dir", default=os.environ.get("OUT") or "outputs/device_check")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per path (default 4; --tiny 2).")
    parser.add_argument("--kernels_only", action="store_true", help="Only step 1 (run in-process; used by step 1).")
    return parser.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    kernels_path = os.path.join(args.output_dir, "attention_kernels.json")
    if args.kernels_only:
        return kernel_check(kernels_path, run_record(argv, __file__), args.token_file, args.tiny)

    start = time.perf_counter()

    def remaining() -> float:
        return args.budget_seconds - (time.perf_counter() - start)

    summary = {"budget_seconds": args.budget_seconds, "tiny": args.tiny, "token_file": args.token_file, "steps": []}

    # 1. attention kernels, in a process of its own (a kernel that hangs cannot take the rest down).
    kernel_command = [sys.executable, __file__, "--kernels_only", "--output_dir", args.output_dir]
    kernel_command += ["--token_file", args.token_file] if args.token_file else []
    kernel_command += ["--tiny"] if args.tiny else []
    print(f"=== attention kernels\n$ {' '.join(kernel_command)}", flush=True)
    summary["attention_kernels_status"] = run_limited(kernel_command, min(75.0, remaining()))
    if summary["attention_kernels_status"].startswith("killed"):
        print("attention kernels: time limit reached; using what was measured", flush=True)
    kernels = read_kernels(kernels_path)
    dropout = 0.0 if args.tiny else 0.1  # starcoder2-3b preset: attention_dropout 0.1; tiny: 0.0
    attention = choose_kernel(kernels, dropout)
    if args.tiny and attention == "sdpa_varlen":
        attention = "sdpa_blocked"
    summary["attention_kernels"] = kernels
    summary["chosen_attention"] = attention
    print(f"chosen attention: {attention}", flush=True)

    data = ["--token_file", args.token_file] if args.token_file else ["--synthetic", "400"]
    steps = str(args.steps or (2 if args.tiny else 4))
    if args.tiny:
        common = ["--model_config", "tiny", "--steps", steps, "--warmup", "1", *data, "--max_tokens", "300000"]
        common += ["--attn_implementation", attention, "--use_cpu", "true"]
        short = ["--seq_length", "1024", "--per_device_train_batch_size", "2"]
        long = ["--seq_length", "2048", "--per_device_train_batch_size", "1"]
        long_ours, long_plain = ["--loss_chunk_size", "1024"], []
        limits = {"4k": 150.0, "16k": 150.0, "4k-compiled": 0.0}
    else:
        common = ["--model_config", "starcoder2-3b", "--steps", steps, "--warmup", "2", *data, "--bf16", "true"]
        common += ["--attn_implementation", attention, "--logging_nan_inf_filter", "false"]
        short = ["--seq_length", "4096", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"]
        long = ["--seq_length", "16384", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"]
        # 16k: the logits of one sequence would take 9.7 GB (12 bytes x 49,152 per token): chunk the loss;
        # keep the activations of 16 of the 30 layers (about 1.7 GB each), checkpoint the other 14.
        long_ours = ["--loss_chunk_size", "4096", "--gradient_checkpointing", "true"]
        long_ours += ["--gradient_checkpointing_layers", "14", "--gradient_checkpointing_kwargs", USE_REENTRANT_FALSE]
        long_plain = ["--plain", "gradient_checkpointing=true"]
        limits = {"4k": 100.0, "16k": 110.0, "4k-compiled": 120.0}

    # The fallback when 16k does not fit: fewer activations kept, every layer checkpointed, ours alone.
    all_checkpointed = ["--loss_chunk_size", "4096", "--gradient_checkpointing", "true"]
    all_checkpointed += ["--gradient_checkpointing_kwargs", USE_REENTRANT_FALSE]
    plan = [("4k", common + short + ["--baseline"]), ("16k", common + long + long_ours + ["--baseline"] + long_plain)]
    for name, words in plan:
        if remaining() < 40:
            summary["steps"].append({"label": name, "skipped": f"{remaining():.0f} s of the budget left"})
            continue
        report = run_benchmark(BENCHMARK, name, words, min(limits[name], remaining()), args.output_dir)
        ours = report.get("results", {}).get("ours", {})
        if name == "16k" and "out of memory" in ours.get("error", "") and remaining() > 60:
            words = common + long + all_checkpointed
            retry = run_benchmark(
                BENCHMARK, "16k-all-checkpointed", words, min(limits[name], remaining()), args.output_dir
            )
            report["results"]["ours (all layers checkpointed)"] = retry.get("results", {}).get("ours", retry)
        summary["steps"].append(report)
    if limits["4k-compiled"] and remaining() > 90:
        words = common + short + ["--compile_layers", "true"]
        limit = min(limits["4k-compiled"], remaining())
        summary["steps"].append(run_benchmark(BENCHMARK, "4k-compiled", words, limit, args.output_dir))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    # The record is taken last: reading the GPU's name before the steps may start CUDA in this process, and a
    # CUDA context here would take device memory from the benchmarks it starts.
    summary = {**run_record(argv, __file__), **summary}
    write_json(os.path.join(args.output_dir, "device_check.json"), summary)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
