"""The device check's loss kernels: lm_head + causal cross-entropy, forward and backward, four ways.

For one sequence of `tokens` final hidden states (3B: hidden 3072, vocabulary 49,152; tiny: 256, 4,096) with
random labels (a tenth of them -100), in bf16 on CUDA (fp32 on a CPU):
- transformers: logits = lm_head(h), then transformers' ForCausalLMLoss (fp32 logits, kept for the backward);
- chunked, liger, cut_cross_entropy: training/loss.py's `training_loss_function`, what the Trainer runs:
  chunks of 4096 positions (tiny 512) with the logits rebuilt backward; Liger-Kernel's fused linear
  cross-entropy (CUDA; gradients computed in the forward); cut cross-entropy (CUDA; logits never stored).
Each is timed (forward + backward, after a warm-up call that also compiles Triton kernels), its peak memory
above the inputs is taken (torch.cuda.max_memory_allocated), and its loss and its gradients with respect to
the hidden states and the weight are compared with an fp32 reference (the loss of fp32 logits). A kernel is
correct when it is about as close to the reference as transformers' own bf16 loss is (at most 3x its
error, or 1e-2). A kernel that is not installed, or needs CUDA, is recorded as such.
Cost at 16k tokens with 3B's shapes: the fp32 reference's logits and their gradient, about 7 GB; seconds.
"""

import json
import time

import torch
from torch import nn

from starcoder2_train.benchmarking.provenance import write_json
from starcoder2_train.data.special_tokens import IGNORE_INDEX
from starcoder2_train.training.loss import training_loss_function

KERNELS = ("transformers", "chunked", "liger", "cut_cross_entropy")


def transformers_loss(hidden, weight, labels):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(nn.functional.linear(hidden, weight), labels, weight.shape[0])


class _Head(nn.Module):
    """lm_head as a module over a given weight tensor (its gradient flows to that tensor)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, hidden):
        return nn.functional.linear(hidden, self.weight)


def project_loss(kernel: str, chunk_size: int):
    """training/loss.py's loss function for `kernel` (what the Trainer runs), over a (tokens, hidden) problem."""
    function = training_loss_function(kernel, chunk_size)

    def loss(hidden, weight, labels):
        return function(hidden[None], _Head(weight), labels[None])

    return loss


def reference_loss(hidden, weight, labels):
    """fp32 logits and cross-entropy over the shifted labels: the truth."""
    logits = hidden.float() @ weight.float().t()
    return nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)


NEEDS = {"liger": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}


def unavailable(kernel: str, device) -> str | None:
    """Why `kernel` cannot run here ("not installed: ...", "needs CUDA"), or None."""
    if kernel not in NEEDS:
        return None
    try:
        __import__(NEEDS[kernel])
    except Exception as error:  # ImportError, or a Triton that fails to load on this machine
        return f"not installed: {type(error).__name__}: {str(error)[:120]}"
    return "needs CUDA (Triton kernels)" if device.type != "cuda" else None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(function, hidden, weight, labels):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = function(h, w, labels)
    loss.backward()
    return [loss.detach().float(), h.grad, w.grad]


def relative_errors(values, truth) -> list[float]:
    return [
        float((value.float() - exact).abs().max() / exact.abs().max().clamp_min(1e-12))
        for value, exact in zip(values, truth)
    ]


def measure(function, hidden, weight, labels, truth, repeats: int) -> dict:
    """Time, peak memory and errors of one loss function on one problem."""
    device = hidden.device
    start = time.perf_counter()
    values = forward_backward(function, hidden, weight, labels)  # compiles Triton kernels where needed
    synchronize(device)
    entry = {"first_call_s": time.perf_counter() - start}
    entry["relative_error_loss_dh_dw"] = relative_errors(values, truth)
    del values
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(repeats):
        forward_backward(function, hidden, weight, labels)
    synchronize(device)
    entry["forward_backward_ms"] = (time.perf_counter() - start) / repeats * 1e3
    if device.type == "cuda":
        entry["peak_extra_memory_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
    return entry


def loss_kernel_check(output_path: str, record: dict, tiny: bool = False, lengths=None) -> dict:
    """Check and time every kernel at each length; {**record, "kernels": [...]} is rewritten to output_path
    after each entry."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden_size, vocab = (256, 4096) if tiny else (3072, 49152)
    lengths = lengths or ((1024, 2048) if tiny else (4096, 16384))
    chunk_size = 512 if tiny else 4096
    report = {**record, "hidden_size": hidden_size, "vocab_size": vocab, "dtype": str(dtype), "kernels": []}
    generator = torch.Generator(device=device).manual_seed(0)
    for tokens in lengths:
        hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=generator)
        weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator) * 0.02
        labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
        labels[torch.rand(tokens, device=device, generator=generator) < 0.1] = IGNORE_INDEX
        truth = forward_backward(reference_loss, hidden.float(), weight.float(), labels)
        baseline_error = None
        for kernel in KERNELS:
            entry = {"kernel": kernel, "tokens": tokens}
            reason = unavailable(kernel, device)
            if reason:
                entry["status"] = reason
            else:
                try:
                    function = transformers_loss if kernel == "transformers" else project_loss(kernel, chunk_size)
                    entry.update(measure(function, hidden, weight, labels, truth, repeats=5 if cuda else 1))
                    error = max(entry["relative_error_loss_dh_dw"])
                    if kernel == "transformers":
                        baseline_error = error
                    entry["correct"] = error <= max(3 * (baseline_error or 0.0), 1e-2)
                except Exception as error:  # recorded; the other kernels still run
                    entry["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            report["kernels"].append(entry)
            print(json.dumps(entry), flush=True)
            write_json(output_path, report)
        del truth, hidden, weight
        if cuda:
            torch.cuda.empty_cache()
    return report
