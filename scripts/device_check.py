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
Writes device_check.json (everything) and one JSON per benchmark; prints a table last.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token_file", help="Token rows (.npz from benchmark.py --save_token_file); else synthetic.")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny model, short sequences, few steps.")
    parser.add_argument("--budget_seconds", type=float, default=285.0, help="Stop starting steps after this long.")
    parser.add_argument("--output_dir", default=os.environ.get("OUT") or "outputs/device_check")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per path (default 4; --tiny 2).")
    parser.add_argument("--kernels_only", action="store_true", help="Only step 1 (run in-process; used by step 1).")
    return parser.parse_args(argv)


# ---- step 1: attention kernels ---------------------------------------------------------------------------------


def attention_pairs(documents_of_row, window) -> int:
    """Query-key pairs a causal, windowed, per-document attention computes (the model FLOPs' k, summed)."""
    total = 0
    for length in documents_of_row:
        full = min(length, window) if window else length
        total += full * (full + 1) // 2 + (length - full) * full
    return total


def load_script(name: str):
    """A module of scripts/ by its path (scripts/ on sys.path would let scripts/evaluate.py shadow a library)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_check(args, output_path: str) -> list[dict]:
    """Time and check the attention kernels; the results are rewritten to output_path after each one."""
    import numpy as np
    import pyarrow as pa
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from starcoder2_train.data.collators import document_boundaries, document_ids
    from starcoder2_train.data.packing import PackedDataset
    from starcoder2_train.model.attention import blocked_sdpa_attention_forward, varlen_attention_forward

    benchmark = load_script("benchmark")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    heads, kv_heads, dim, window = (24, 2, 128, 4096) if not args.tiny else (8, 2, 32, 512)
    lengths = (4096, 16384) if not args.tiny else (1024, 2048)
    documents = load_token_documents(args.token_file) if args.token_file else benchmark.synthetic_documents(200, 4096)
    table = pa.table({"input_ids": pa.array([d.tolist() for d in documents], type=pa.list_(pa.int32()))})
    scale = dim**-0.5

    class Module:  # what transformers' attention functions read from the attention module
        num_key_value_groups = heads // kv_heads
        is_causal = True
        training = True

    problems = {}
    for seq_length in lengths:
        packed = PackedDataset(table, seq_length, benchmark.SYNTHETIC_SPECIAL, shuffle_seed=0)
        position_ids = torch.from_numpy(packed[0]["position_ids"])[None]
        boundaries = document_boundaries(position_ids)
        row_documents = np.diff(boundaries["cu_seq_lens_q"].numpy()).tolist()
        position_ids = position_ids.to(device)
        boundaries = {key: value.to(device) if torch.is_tensor(value) else value for key, value in boundaries.items()}
        generator = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, heads, seq_length, dim, device=device, dtype=dtype, generator=generator)
        k, v = (
            torch.randn(1, kv_heads, seq_length, dim, device=device, dtype=dtype, generator=generator)
            for _ in range(2)
        )
        grad_out = torch.randn(1, seq_length, heads, dim, device=device, dtype=dtype, generator=generator)
        documents_ids = document_ids(position_ids)[0]
        positions = torch.arange(seq_length, device=device)
        allowed = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] < window)
        full_mask = (allowed & (documents_ids[:, None] == documents_ids[None, :]))[None, None]

        def reference(q, k, v, mask=full_mask):
            return sdpa_attention_forward(Module, q, k, v, mask, dropout=0.0, scaling=scale)[0]

        def varlen(q, k, v, dropout=0.0, boundaries=boundaries):
            return varlen_attention_forward(
                Module, q, k, v, None, dropout=dropout, scaling=scale, sliding_window=window, **boundaries
            )[0]

        def blocked(q, k, v, position_ids=position_ids):
            return blocked_sdpa_attention_forward(
                Module, q, k, v, None, scaling=scale, sliding_window=window, position_ids=position_ids
            )[0]

        kernels = {"sdpa (transformers' packed mask)": reference, "sdpa_blocked": blocked}
        if cuda:
            kernels["sdpa_varlen"] = varlen
            try:
                kernels["flex_attention"] = make_flex(documents_ids, window, scale, seq_length, device)
            except Exception as error:  # reported when its turn comes
                kernels["flex_attention"] = failing(error)
        problems[seq_length] = dict(
            tensors=(q, k, v, grad_out),
            kernels=kernels,
            varlen=varlen,
            documents=len(row_documents),
            pairs=attention_pairs(row_documents, window),
        )

    def relative_errors(values, truth):
        return [
            float((ours.float() - exact).abs().max() / exact.abs().max().clamp_min(1e-6))
            for ours, exact in zip(values, truth)
        ]

    results, truths, reference_errors = [], {}, {}
    # flex_attention last: it compiles, and a slow compilation must not keep the others from being measured.
    order = [
        (s, name) for name in ("sdpa (transformers' packed mask)", "sdpa_varlen", "sdpa_blocked") for s in lengths
    ] + [(s, "flex_attention") for s in lengths]
    for seq_length, name in order:
        problem = problems[seq_length]
        if name not in problem["kernels"]:
            continue
        q, k, v, grad_out = problem["tensors"]
        entry = {"kernel": name, "seq_length": seq_length, "documents_in_row": problem["documents"]}
        try:
            if name.startswith("sdpa ("):
                # The truth: transformers' masked sdpa in fp32. A kernel is correct when it is about as close
                # to it as sdpa itself is in bf16 (a kernel that lets documents or the window leak is far off).
                exact = time_kernel(
                    problem["kernels"][name], q.float(), k.float(), v.float(), grad_out.float(), device, repeats=0
                )
                truths[seq_length] = [value.float() for value in exact["values"]]
            measured = time_kernel(problem["kernels"][name], q, k, v, grad_out, device, repeats=5 if cuda else 2)
            values = measured.pop("values")
            entry.update(measured)
            entry["attention_tflops"] = 12 * heads * dim * problem["pairs"] / entry["forward_backward_ms"] / 1e9
            if seq_length in truths:
                errors = relative_errors(values, truths[seq_length])
                entry["max_relative_error_out_dq_dk_dv"] = errors
                if name.startswith("sdpa ("):
                    reference_errors[seq_length] = max(errors)
                else:
                    entry["correct"] = max(errors) <= max(3 * reference_errors.get(seq_length, 0.0), 1e-2)
            if name == "sdpa_varlen":  # the kernel's own dropout must run too (its values are random)
                out = problem["varlen"](q.detach().requires_grad_(), k, v, dropout=0.1)
                out.sum().backward()
                entry["runs_with_dropout"] = True
            del values
        except Exception as error:  # recorded; the other kernels still run
            entry["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        results.append(entry)
        print(json.dumps(entry), flush=True)
        with open(output_path, "w") as handle:
            json.dump(results, handle, indent=1)
    return results


def failing(error):
    def kernel(*args):
        raise error

    return kernel


def make_flex(documents_ids, window, scale, seq_length, device):
    """flex_attention, compiled, with a block mask of the documents, causality and the window (built once, as
    transformers builds one per forward for all layers)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def mask_mod(batch, head, q_index, kv_index):
        same = documents_ids[q_index] == documents_ids[kv_index]
        return (kv_index <= q_index) & (q_index - kv_index < window) & same

    block_mask = create_block_mask(mask_mod, 1, None, seq_length, seq_length, device=device)

    def flex(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True).transpose(1, 2)

    return flex


def time_kernel(kernel, q, k, v, grad_out, device, repeats: int) -> dict:
    import torch

    def once():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = kernel(*inputs)
        out.backward(grad_out)
        return [out.detach(), *(t.grad for t in inputs)]

    start = time.perf_counter()
    values = once()  # compiles where a kernel needs it
    synchronize(device)
    first = time.perf_counter() - start
    if repeats == 0:
        return {"values": values}
    once()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    synchronize(device)
    elapsed = (time.perf_counter() - start) / repeats
    entry = {"forward_backward_ms": elapsed * 1e3, "first_call_s": first, "values": values}
    if device.type == "cuda":
        entry["extra_memory_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
    return entry


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_token_documents(path):
    import numpy as np

    with np.load(path) as data:
        return np.split(data["tokens"].astype(np.int64), np.cumsum(data["lengths"])[:-1])


def choose_kernel(results: list[dict], model_attention_dropout: float) -> str:
    """Fastest correct kernel at the longest length (summed over lengths), among those the model can train with."""
    usable = {}
    for entry in results:
        name = "sdpa" if entry["kernel"].startswith("sdpa (") else entry["kernel"]  # the reference is correct
        if "error" in entry or not (name == "sdpa" or entry.get("correct")):
            continue
        if name == "flex_attention" and model_attention_dropout > 0:
            continue  # transformers' flex_attention refuses dropout in training
        usable.setdefault(name, []).append(entry["forward_backward_ms"])
    lengths = len({entry["seq_length"] for entry in results})
    usable = {name: sum(times) for name, times in usable.items() if len(times) == lengths}
    return min(usable, key=usable.get) if usable else "sdpa"


# ---- steps 2-4: training benchmarks -------------------------------------------------------------------------------


def run_step(name: str, words: list[str], limit: float, output_dir: str) -> dict:
    """Run benchmark.py in its own process, killed after `limit` seconds; its JSON report, or what went wrong."""
    output = os.path.join(output_dir, f"benchmark-{name}.json")
    command = [sys.executable, os.path.join(HERE, "benchmark.py"), "--label", name, "--output", output, *words]
    print(f"\n=== {name} (limit {limit:.0f} s)\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, timeout=limit, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        status = f"exit {completed.returncode}"
    except subprocess.TimeoutExpired:
        status = f"killed after {limit:.0f} s"
    seconds = time.perf_counter() - start
    if os.path.isfile(output):
        with open(output) as handle:
            report = json.load(handle)
    else:
        report = {"label": name, "results": {}, "error": status}
    report.update(status=status, seconds=round(seconds, 1))
    return report


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    os.makedirs(args.output_dir, exist_ok=True)
    if args.kernels_only:
        return kernel_check(args, os.path.join(args.output_dir, "attention_kernels.json"))

    start = time.perf_counter()

    def remaining() -> float:
        return args.budget_seconds - (time.perf_counter() - start)

    summary = {"budget_seconds": args.budget_seconds, "tiny": args.tiny, "token_file": args.token_file, "steps": []}

    # 1. attention kernels, in a process of its own (a kernel that hangs cannot take the rest down).
    kernel_command = [sys.executable, __file__, "--kernels_only", "--output_dir", args.output_dir]
    kernel_command += ["--token_file", args.token_file] if args.token_file else []
    kernel_command += ["--tiny"] if args.tiny else []
    print(f"=== attention kernels\n$ {' '.join(kernel_command)}", flush=True)
    try:
        subprocess.run(kernel_command, timeout=min(75.0, remaining()), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        print("attention kernels: time limit reached; using what was measured", flush=True)
    kernels_path = os.path.join(args.output_dir, "attention_kernels.json")
    kernels = json.load(open(kernels_path)) if os.path.isfile(kernels_path) else []
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
        common = [
            "--model_config",
            "tiny",
            "--steps",
            steps,
            "--warmup",
            "1",
            *data,
            "--max_tokens",
            "300000",
            "--attn_implementation",
            attention,
            "--use_cpu",
            "true",
        ]
        short, long = (
            ["--seq_length", "1024", "--per_device_train_batch_size", "2"],
            ["--seq_length", "2048", "--per_device_train_batch_size", "1"],
        )
        long_ours, long_plain = ["--loss_chunk_size", "1024"], []
        limits = {"4k": 150.0, "16k": 150.0, "4k-compiled": 0.0}
    else:
        common = [
            "--model_config",
            "starcoder2-3b",
            "--steps",
            steps,
            "--warmup",
            "2",
            *data,
            "--bf16",
            "true",
            "--attn_implementation",
            attention,
            "--logging_nan_inf_filter",
            "false",
        ]
        short = ["--seq_length", "4096", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"]
        long = ["--seq_length", "16384", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"]
        # 16k: the logits of one sequence would take 9.7 GB (12 bytes x 49,152 per token): chunk the loss;
        # keep the activations of 16 of the 30 layers (about 1.7 GB each), checkpoint the other 14.
        long_ours = [
            "--loss_chunk_size",
            "4096",
            "--gradient_checkpointing",
            "true",
            "--gradient_checkpointing_layers",
            "14",
            "--gradient_checkpointing_kwargs",
            '{"use_reentrant": false}',
        ]
        long_plain = ["--plain", "gradient_checkpointing=true"]
        limits = {"4k": 100.0, "16k": 110.0, "4k-compiled": 120.0}

    plan = [("4k", common + short + ["--baseline"]), ("16k", common + long + long_ours + ["--baseline"] + long_plain)]
    for name, words in plan:
        if remaining() < 40:
            summary["steps"].append({"label": name, "skipped": f"{remaining():.0f} s of the budget left"})
            continue
        report = run_step(name, words, min(limits[name], remaining()), args.output_dir)
        ours = report.get("results", {}).get("ours", {})
        if name == "16k" and "out of memory" in ours.get("error", "") and remaining() > 60:
            # Fewer activations kept: checkpoint every layer, and measure ours alone.
            words = (
                common
                + long
                + [
                    "--loss_chunk_size",
                    "4096",
                    "--gradient_checkpointing",
                    "true",
                    "--gradient_checkpointing_kwargs",
                    '{"use_reentrant": false}',
                ]
            )
            retry = run_step("16k-all-checkpointed", words, min(limits[name], remaining()), args.output_dir)
            report["results"]["ours (all layers checkpointed)"] = retry.get("results", {}).get("ours", retry)
        summary["steps"].append(report)
    if limits["4k-compiled"] and remaining() > 90:
        summary["steps"].append(
            run_step(
                "4k-compiled",
                common + short + ["--compile_layers", "true"],
                min(limits["4k-compiled"], remaining()),
                args.output_dir,
            )
        )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.output_dir, "device_check.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    print(f"\n==== device check: {summary['seconds']} s; attention used: {summary['chosen_attention']}")
    for entry in summary["attention_kernels"]:
        if "error" in entry:
            print(f"  kernel {entry['kernel']:34} s={entry['seq_length']:6}  {entry['error'][:90]}")
        else:
            print(
                f"  kernel {entry['kernel']:34} s={entry['seq_length']:6}  {entry['forward_backward_ms']:8.2f} ms "
                f"fwd+bwd  {entry.get('attention_tflops', 0):8.3g} TFLOP/s  "
                f"correct={entry.get('correct', 'reference')}"
            )
    header = f"  {'case':22}{'path':32}{'useful tok/s/dev':>18}{'MFU causal':>12}{'peak GB':>9}{'data wait':>10}"
    print(header)
    for step in summary["steps"]:
        if "skipped" in step:
            print(f"  {step['label']:22}skipped: {step['skipped']}")
            continue
        for path, result in step.get("results", {}).items():
            if "error" in result:
                print(f"  {step['label']:22}{path:32}{result['error'][:70]}")
                continue
            mfu = result.get("mfu_causal")
            print(
                f"  {step['label']:22}{path:32}{result.get('real_tokens_per_second_per_device', 0):>18,.0f}"
                f"{(f'{mfu:.1%}' if mfu is not None else '-'):>12}{result.get('peak_memory_gb', 0):>9.1f}"
                f"{result.get('data_wait_share', 0):>10.1%}"
            )
        if step.get("useful_tokens_per_second_ratio"):
            ratio = step["useful_tokens_per_second_ratio"]
            print(f"  {step['label']:22}{'ours / plain, useful tokens/s':32}{ratio:>17.2f}x")
        if not step.get("results"):
            print(f"  {step['label']:22}{step.get('error', step.get('status'))}")


if __name__ == "__main__":
    main()
