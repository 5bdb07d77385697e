"""The device check's attention kernel check: which document-aware attention to train with on this machine.

On one packed row of the data's documents, with 3B's shapes (24 query heads, 2 key/value heads, head size 128,
window 4096; `tiny`: 8, 2, 32, 512), forward + backward: sdpa_varlen (PyTorch's FlashAttention-2, and where
their packages are importable FA3 and FA4 through torch.nn.attention.activate_flash_attention_impl, named
sdpa_varlen+fa3 and sdpa_varlen+fa4; "not installed" otherwise), sdpa_blocked, flex_attention and
transformers' sdpa with its per-document mask (the reference). Each is checked against the reference in fp32
and timed with attention dropout 0.0 and, where the kernel supports dropout, 0.1 (`dropout_forward_backward_ms`;
FA3, FA4 and flex_attention have none). On CUDA, first, sdpa_varlen's backward is checked to replay its forward's
dropout mask at DROPOUT (model/dropout_check.py, with a control kernel that replays another mask and must fail);
if it does not, sdpa_varlen's entries carry a `dropout_error`. `choose_kernel` takes the fastest correct one the
model can train with at its dropout. The results are written to attention_kernels.json as {...provenance...,
"dropout_gradient_check": {...}, "kernels": [one entry per kernel and length]}.
"""

import contextlib
import functools
import importlib
import json
import os
import time

import numpy as np
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from starcoder2_train.benchmarking.documents import (
    SYNTHETIC_SPECIAL,
    load_token_file,
    synthetic_documents,
    token_rows,
)
from starcoder2_train.benchmarking.provenance import write_json
from starcoder2_train.data.batches.collators import document_boundaries, document_ids
from starcoder2_train.data.windows.packing import PackedDataset
from starcoder2_train.model.attention import blocked_sdpa_attention_forward, varlen_attention_forward
from starcoder2_train.model.dropout_check import dropout_gradient_check, flash_kernel_with_another_mask

REFERENCE = "sdpa (transformers' packed mask)"
DROPOUT = 0.1  # the 3B preset's attention dropout
# FlashAttention implementations PyTorch can route its flash kernels to, and the module each needs.
FLASH_IMPLS = {"fa3": ("FA3", "flash_attn_interface"), "fa4": ("FA4", "flash_attn.cute.interface")}
NO_DROPOUT = ("flex_attention", "sdpa_varlen+fa3", "sdpa_varlen+fa4")


def flash_impl_missing(impl: str) -> str | None:
    """Why FA3/FA4 (`impl`) cannot be activated here, or None: "not installed (...)" or a missing torch API."""
    try:
        from torch.nn.attention import activate_flash_attention_impl  # noqa: F401
    except ImportError:
        return f"not available: torch {torch.__version__} has no activate_flash_attention_impl"
    try:
        importlib.import_module(FLASH_IMPLS[impl][1])
    except Exception as error:
        return f"not installed ({FLASH_IMPLS[impl][1]}: {type(error).__name__})"
    return None


@contextlib.contextmanager
def flash_impl(impl: str | None):
    """Route PyTorch's flash-attention kernels to FA3/FA4 inside the block (nothing for None)."""
    if impl is None:
        yield
        return
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    activate_flash_attention_impl(FLASH_IMPLS[impl][0])
    try:
        yield
    finally:
        restore_flash_attention_impl()


def attention_pairs(documents_of_row, window) -> int:
    """Query-key pairs a causal, windowed, per-document attention computes (the model FLOPs' k, summed)."""
    total = 0
    for length in documents_of_row:
        full = min(length, window) if window else length
        total += full * (full + 1) // 2 + (length - full) * full
    return total


def failing(error):
    def kernel(*args):
        raise error

    return kernel


def make_flex(documents_ids, window, scale, seq_length, device):
    """flex_attention, compiled, with a block mask of the documents, causality and the window (built once, as
    transformers builds one per forward for all layers)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def mask_mod(batch, head, q_index, kv_index):
        same = documents_ids[q_index] == documents_ids[kv_index]
        return (kv_index <= q_index) & (q_index - kv_index < window) & same

    block_mask = create_block_mask(mask_mod, 1, None, seq_length, seq_length, device=device)

    def flex(q, k, v):
        return compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True).transpose(1, 2)

    return flex


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_kernel(kernel, q, k, v, grad_out, device, repeats: int) -> dict:
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


def time_dropout(kernel, q, k, v, grad_out, device, repeats: int) -> dict:
    """Forward + backward time of `kernel` with attention dropout DROPOUT, or why it failed."""
    try:
        timed = time_kernel(functools.partial(kernel, dropout=DROPOUT), q, k, v, grad_out, device, repeats)
    except Exception as error:  # the kernel without dropout is still measured
        return {"dropout": DROPOUT, "runs_with_dropout": False, "dropout_error": f"{type(error).__name__}: {error}"}
    return {"dropout": DROPOUT, "dropout_forward_backward_ms": timed["forward_backward_ms"], "runs_with_dropout": True}


def dropout_check_entry(shapes, device, dtype) -> dict:
    """`dropout_gradient_check` of sdpa_varlen at `shapes` and DROPOUT (64 draws), and of the control kernel whose
    backward replays another mask (`control_with_another_mask`: its ratio must exceed 1, or the check sees nothing)."""
    heads, kv_heads, dim, window = shapes
    check = functools.partial(
        dropout_gradient_check, heads, kv_heads, dim, dropout=DROPOUT, device=device, dtype=dtype, window=window
    )
    entry = {"kernel": "sdpa_varlen"}
    try:
        entry.update(check(draws=64))
        control = check(draws=4, kernel=flash_kernel_with_another_mask)
        entry["control_with_another_mask"] = {key: control[key] for key in ("mask_replay_ratio", "passed")}
    except Exception as error:  # recorded; the kernels are still timed
        entry.update(passed=False, error=f"{type(error).__name__}: {str(error)[:300]}")
    print(json.dumps({"dropout_gradient_check": entry}), flush=True)
    return entry


def make_problem(table, seq_length, special, shapes, device, dtype) -> dict:
    """One packed row of `seq_length` tokens: random q, k, v and output gradient, and the kernels to try on it."""
    heads, kv_heads, dim, window = shapes
    scale = dim**-0.5

    class Module:  # what transformers' attention functions read from the attention module
        num_key_value_groups = heads // kv_heads
        is_causal = True
        training = True

    packed = PackedDataset(table, seq_length, special, shuffle_seed=0)  # only its positions are used
    position_ids = torch.from_numpy(packed[0]["position_ids"])[None]
    boundaries = document_boundaries(position_ids)
    row_documents = np.diff(boundaries["cu_seq_lens_q"].numpy()).tolist()
    position_ids = position_ids.to(device)
    boundaries = {key: value.to(device) if torch.is_tensor(value) else value for key, value in boundaries.items()}
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, seq_length, dim, device=device, dtype=dtype, generator=generator)
    k, v = (
        torch.randn(1, kv_heads, seq_length, dim, device=device, dtype=dtype, generator=generator) for _ in range(2)
    )
    grad_out = torch.randn(1, seq_length, heads, dim, device=device, dtype=dtype, generator=generator)
    documents_ids = document_ids(position_ids)[0]
    positions = torch.arange(seq_length, device=device)
    allowed = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] < window)
    full_mask = (allowed & (documents_ids[:, None] == documents_ids[None, :]))[None, None]

    def reference(q, k, v, mask=full_mask, dropout=0.0):
        return sdpa_attention_forward(Module, q, k, v, mask, dropout=dropout, scaling=scale)[0]

    def varlen(q, k, v, dropout=0.0, boundaries=boundaries):
        return varlen_attention_forward(
            Module, q, k, v, None, dropout=dropout, scaling=scale, sliding_window=window, **boundaries
        )[0]

    def blocked(q, k, v, position_ids=position_ids, dropout=0.0):
        return blocked_sdpa_attention_forward(
            Module, q, k, v, None, dropout=dropout, scaling=scale, sliding_window=window, position_ids=position_ids
        )[0]

    kernels = {REFERENCE: reference, "sdpa_blocked": blocked}
    if device.type == "cuda":
        kernels["sdpa_varlen"] = varlen
        for impl in FLASH_IMPLS:
            kernels[f"sdpa_varlen+{impl}"] = varlen
        try:
            kernels["flex_attention"] = make_flex(documents_ids, window, scale, seq_length, device)
        except Exception as error:  # reported when its turn comes
            kernels["flex_attention"] = failing(error)
    return dict(
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


def kernel_check(output_path: str, record: dict, token_file: str | None = None, tiny: bool = False) -> dict:
    """Time and check the attention kernels; {**record, "kernels": [...]} is rewritten to output_path after
    each one (so that a kernel that hangs past the time limit leaves the others' results)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = (24, 2, 128, 4096) if not tiny else (8, 2, 32, 512)
    heads, _, dim, _ = shapes
    lengths = (4096, 16384) if not tiny else (1024, 2048)
    if token_file:
        documents, special = load_token_file(token_file)
    else:
        documents, special = synthetic_documents(200, 4096), SYNTHETIC_SPECIAL
    table = token_rows(documents)
    problems = {s: make_problem(table, s, special, shapes, device, dtype) for s in lengths}

    report = {**record, "kernels": []}
    if cuda:
        report["dropout_gradient_check"] = dropout_check_entry(shapes, device, dtype)
        write_json(output_path, report)
    results, truths, reference_errors = report["kernels"], {}, {}
    # flex_attention last: it compiles, and a slow compilation must not keep the others from being measured.
    names = (REFERENCE, "sdpa_varlen", *(f"sdpa_varlen+{impl}" for impl in FLASH_IMPLS), "sdpa_blocked")
    order = [(s, name) for name in names for s in lengths]
    order += [(s, "flex_attention") for s in lengths]
    for seq_length, name in order:
        problem = problems[seq_length]
        if name not in problem["kernels"]:
            continue
        q, k, v, grad_out = problem["tensors"]
        entry = {"kernel": name, "seq_length": seq_length, "documents_in_row": problem["documents"]}
        impl = name.partition("+")[2] or None
        missing = impl and flash_impl_missing(impl)
        if missing:
            entry["status"] = missing
            results.append(entry)
            print(json.dumps(entry), flush=True)
            write_json(output_path, report)
            continue
        entry["supports_dropout"] = name not in NO_DROPOUT
        try:
            if name == REFERENCE:
                # The truth: transformers' masked sdpa in fp32. A kernel is correct when it is about as close
                # to it as sdpa itself is in bf16 (a kernel that lets documents or the window leak is far off).
                exact = time_kernel(
                    problem["kernels"][name], q.float(), k.float(), v.float(), grad_out.float(), device, repeats=0
                )
                truths[seq_length] = [value.float() for value in exact["values"]]
            with flash_impl(impl):
                measured = time_kernel(problem["kernels"][name], q, k, v, grad_out, device, repeats=5 if cuda else 2)
            values = measured.pop("values")
            entry.update(measured)
            entry["attention_tflops"] = 12 * heads * dim * problem["pairs"] / entry["forward_backward_ms"] / 1e9
            if seq_length in truths:
                errors = relative_errors(values, truths[seq_length])
                entry["max_relative_error_out_dq_dk_dv"] = errors
                if name == REFERENCE:
                    reference_errors[seq_length] = max(errors)
                else:
                    entry["correct"] = max(errors) <= max(3 * reference_errors.get(seq_length, 0.0), 1e-2)
            if entry["supports_dropout"]:  # timed with the model's dropout too (its values are random)
                entry.update(time_dropout(problem["kernels"][name], q, k, v, grad_out, device, 5 if cuda else 1))
            if name == "sdpa_varlen" and not report.get("dropout_gradient_check", {}).get("passed", True):
                entry["dropout_error"] = "fails the dropout gradient check (the report's dropout_gradient_check)"
            del values
        except Exception as error:  # recorded; the other kernels still run
            entry["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        results.append(entry)
        print(json.dumps(entry), flush=True)
        write_json(output_path, report)
    return report


def read_kernels(path: str) -> list[dict]:
    """The kernel entries of an attention_kernels.json written by `kernel_check`; none when there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return json.load(handle)["kernels"]


def choose_kernel(results: list[dict], model_attention_dropout: float) -> str:
    """Fastest correct kernel (time summed over the lengths) among those the model can train with at its
    dropout, timed with that dropout where measured. "sdpa_varlen+fa3" means attn_implementation sdpa_varlen
    with flash_attention_impl fa3 (see `attention_words`)."""
    usable = {}
    for entry in results:
        name = "sdpa" if entry["kernel"].startswith("sdpa (") else entry["kernel"]  # the reference is correct
        if "error" in entry or "status" in entry or not (name == "sdpa" or entry.get("correct")):
            continue
        unsupported = name in NO_DROPOUT or entry.get("supports_dropout") is False or entry.get("dropout_error")
        if model_attention_dropout > 0 and unsupported:
            continue  # transformers' flex_attention refuses dropout in training; FA3/FA4 have none
        key = "dropout_forward_backward_ms" if model_attention_dropout > 0 else "forward_backward_ms"
        usable.setdefault(name, []).append(entry.get(key, entry["forward_backward_ms"]))
    lengths = len({entry["seq_length"] for entry in results})
    usable = {name: sum(times) for name, times in usable.items() if len(times) == lengths}
    return min(usable, key=usable.get) if usable else "sdpa"


def attention_words(choice: str) -> list[str]:
    """Recipe words for a `choose_kernel` result: sdpa_varlen+fa3 -> --attn_implementation sdpa_varlen
    --flash_attention_impl fa3."""
    kernel, _, impl = choice.partition("+")
    return ["--attn_implementation", kernel, *(["--flash_attention_impl", impl] if impl else [])]
