"""The device check: StarCoder2-3B full-parameter bf16 training under DeepSpeed ZeRO-2 on one H200 (or H100),
this project's path against the baselines transformers offers, every case in under 8 minutes.

    python scripts/device_check.py --output_dir /tmp/dc                    # one H200: about 440 s
    python scripts/device_check.py --tiny --output_dir /tmp/dc             # the same steps on a CPU, minutes

Steps, each in its own process under a time limit, in this order (planned seconds on one H200; a step is
started only while its planned seconds still fit in --budget_seconds, default 450, and a failure or an
out-of-memory is recorded and the next step runs):
  kernels     50 s  (a) attention kernels at 4k and 16k, 3B's heads, bf16, forward + backward, attention
                    dropout 0.0 and 0.1 where supported: sdpa_varlen (FA2; FA3/FA4 where installed, else "not
                    installed"), sdpa_blocked, flex_attention, transformers' masked sdpa (the reference);
                    (b) loss kernels transformers, chunked, liger, cut_cross_entropy at 4k and 16k tokens with
                    3B's hidden size and vocabulary: time, peak memory, loss and gradients against fp32;
                    (g) the GEMM ceiling at 3B's shapes, tokens = the 4k recipe's micro batch x seq_length.
  4k         140 s  (c) recipes/starcoder2-3b/pretrain.yaml: ours, plain and flattening.
  16k        100 s  (d) recipes/starcoder2-3b/long_context.yaml, from-scratch weights (--model_config
                    starcoder2-3b): ours, and flattening with every layer checkpointed.
  profile-4k  45 s  (g) one torch.profiler pass of 4k ours: device time by GEMM, attention, elementwise+norm,
                    optimizer, communication, idle.
  dropout-4k  50 s  (e) 4k ours with the other attention dropout (0.0; the preset has 0.1), with the fastest
                    kernel allowed at that dropout.
  float8      55 s  (f) loss parity: 4 layers of 3B's shapes, 20 steps bf16 then --float8 true, same data and
                    seed (needs torchao and the Trainer's float8 key).
The benchmarks train with the recipe's own keys (micro batch and accumulation read from the recipe at run time;
gradient_checkpointing_layers auto resolved for the recipe's gpu_memory_gb, as run_pretrain.py does) plus
--deepspeed accelerate_configs/deepspeed/zero2.json (the recipes' config) and the chosen attention, on
--token_file's documents or
2,000 synthetic ones, with shorter timing than a full benchmark: at least 5 warm-up steps (and on while
compiling), 10 s timed, 1 repeat per path (benchmark.py's defaults: 10 steps, 60 s, 3 repeats).

Written to --output_dir (default $OUT): device_check.json (everything, rewritten after each step),
memory_peaks.json (each training process's torch.cuda.max_memory_allocated and its recipe words: the fixture
tests/fixtures/gpu_memory_peaks.json), attention_kernels.json, loss_kernels.json, gemm.json and one
benchmark-<step>.json per step; a table is printed last. The code is in starcoder2_train.benchmarking.

The device image lacks deepspeed (and its hjson and pydantic) and has transformers 5.17; liger-kernel,
cut-cross-entropy and torchao are optional (their cases say "not installed" without them); the datasets
library is not needed (synthetic documents or --token_file). Here, in the repository's root:

    P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
       --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 -d .whl"
    python3 -m pip download $P transformers==5.24.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 liger-kernel==0.8.5 \
        cut-cross-entropy==25.1.1 torchao==0.18.0
    DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

(.whl/ is git-ignored; 22 MB.) Then one device call, carry [".whl"], timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 || exit; mkdir -p /tmp/dc;
    python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__)";
    timeout 520 python3 scripts/device_check.py --output_dir /tmp/dc 2>&1 | tee /tmp/dc/device_check.log;
    cp /tmp/dc/device_check.json /tmp/dc/memory_peaks.json /tmp/dc/device_check.log $OUT/;
    tar czf $OUT/device_check.tgz -C /tmp dc
"""

import argparse
import json
import os
import sys

from starcoder2_train.benchmarking.device_cases import RECIPE_4K, Settings, recipe_value, run_plan
from starcoder2_train.benchmarking.isolated import exit_on_sigterm
from starcoder2_train.benchmarking.provenance import run_record, write_json
from starcoder2_train.benchmarking.report import print_summary

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARK = os.path.join(HERE, "benchmark.py")  # started as a command of its own, never imported


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token_file", help="Token rows (.npz from benchmark.py --save_token_file); else synthetic.")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny model, short sequences, seconds.")
    parser.add_argument("--budget_seconds", type=float, default=450.0, help="Start no step that would end later.")
    parser.add_argument("--output_dir", default=os.environ.get("OUT") or "outputs/device_check")
    parser.add_argument("--kernels_only", action="store_true", help="Only the kernels step, in this process.")
    return parser.parse_args(argv)


def kernels(args, argv) -> dict:
    """The kernels step: GEMM ceiling, loss kernels, attention kernels (flex_attention's compilation last)."""
    import torch

    from starcoder2_train.benchmarking.gemm import gemm_benchmark
    from starcoder2_train.benchmarking.kernels import kernel_check
    from starcoder2_train.benchmarking.loss_kernels import loss_kernel_check
    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.model.presets import build_config

    record = run_record(argv, __file__)
    config = build_config(ModelArguments(model_config="tiny" if args.tiny else "starcoder2-3b"), 4096)
    tokens = (256 if args.tiny else recipe_value(RECIPE_4K, "seq_length")) * recipe_value(
        RECIPE_4K, "per_device_train_batch_size"
    )
    gemm = {**record, **gemm_benchmark(config, tokens)}
    write_json(os.path.join(args.output_dir, "gemm.json"), gemm)
    print(json.dumps({key: gemm[key] for key in ("tokens", "dtype", "ceiling_tflops")}), flush=True)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    loss = loss_kernel_check(os.path.join(args.output_dir, "loss_kernels.json"), record, args.tiny)
    attention = kernel_check(
        os.path.join(args.output_dir, "attention_kernels.json"), record, args.token_file, args.tiny
    )
    return {"gemm": gemm, "loss_kernels": loss, "attention_kernels": attention}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    exit_on_sigterm()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.kernels_only:
        return kernels(args, argv)
    settings = Settings(args.output_dir, args.tiny, args.token_file, args.budget_seconds)
    summary_path = os.path.join(args.output_dir, "device_check.json")
    summary = {"budget_seconds": args.budget_seconds, "tiny": args.tiny, "token_file": args.token_file}

    def save(partial: dict) -> None:
        for name in ("attention_kernels", "loss_kernels", "gemm"):
            path = os.path.join(args.output_dir, f"{name}.json")
            if os.path.isfile(path):
                with open(path) as handle:
                    partial[name] = json.load(handle)
        write_json(summary_path, partial)

    summary = run_plan(settings, __file__, BENCHMARK, summary, save)
    # The record is taken last: reading the GPU's name may start CUDA in this process, and a CUDA context
    # here would take device memory from the steps it starts.
    summary = {**run_record(argv, __file__), **summary}
    save(summary)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
