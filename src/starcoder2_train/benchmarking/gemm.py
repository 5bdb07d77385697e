"""The GEMM ceiling: torch.matmul at the model's own shapes, the best TFLOP/s its matmuls can reach here.

For `tokens` = micro batch x seq_length rows of activations and each weight of a decoder layer (q, k, v, o,
c_fc, c_proj) and lm_head (out x in), the three GEMMs of training a linear layer:
forward Y = X·Wᵀ (tokens x in x out), input gradient dX = dY·W (tokens x out x in), and weight gradient
dW = dYᵀ·X (out x tokens x in), each 2·tokens·in·out FLOPs. Each is timed alone (bf16 on CUDA, fp32 on a
CPU; warm-up calls first), and `ceiling_tflops` weighs them as one training step runs them (every layer's
six weights, lm_head once): total FLOPs over total time, the rate the model's matmuls cannot beat on this
machine. Cost on an H100 at 3B's shapes and 16k tokens: about a second of GEMMs plus ~2 GB of operands.
"""

import time

import torch


def linear_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, in features, out features, count per step) of the model's matmul weights."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, layers = config.hidden_size, config.num_hidden_layers
    query, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [
        ("q_proj", hidden, query, layers),
        ("k_proj", hidden, kv, layers),
        ("v_proj", hidden, kv, layers),
        ("o_proj", query, hidden, layers),
        ("c_fc", hidden, config.intermediate_size, layers),
        ("c_proj", config.intermediate_size, hidden, layers),
        ("lm_head", hidden, config.vocab_size, 1),
    ]


def _timer(device):
    """A function returning seconds spent by the device on `call()` run `repeats` times."""

    def measure(call, repeats: int) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / repeats
        begin = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - begin) / repeats

    return measure


def gemm_benchmark(config, tokens: int, device=None, dtype=None, repeats: int | None = None) -> dict:
    """Time the training GEMMs of every weight shape at `tokens` rows; per GEMM and weighted TFLOP/s."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    repeats = repeats or (20 if device.type == "cuda" else 2)
    measure = _timer(device)
    generator = torch.Generator(device=device).manual_seed(0)
    entries, total_flops, total_seconds = [], 0.0, 0.0
    for name, fan_in, fan_out, count in linear_shapes(config):
        x = torch.randn(tokens, fan_in, device=device, dtype=dtype, generator=generator)
        w = torch.randn(fan_out, fan_in, device=device, dtype=dtype, generator=generator)
        dy = torch.randn(tokens, fan_out, device=device, dtype=dtype, generator=generator)
        gemms = {  # (operands as matmul sees them, the call)
            "forward": ((tokens, fan_in, fan_out), lambda x=x, w=w: torch.matmul(x, w.t())),
            "grad_input": ((tokens, fan_out, fan_in), lambda dy=dy, w=w: torch.matmul(dy, w)),
            "grad_weight": ((fan_out, tokens, fan_in), lambda dy=dy, x=x: torch.matmul(dy.t(), x)),
        }
        flops = 2.0 * tokens * fan_in * fan_out
        for kind, ((m, k, n), call) in gemms.items():
            call()  # warm-up: cuBLAS picks its kernel
            measure(call, 2)
            seconds = measure(call, repeats)
            entries.append(
                {
                    "weight": name,
                    "gemm": kind,
                    "shape": f"({m}, {k}) @ ({k}, {n})",
                    "ms": seconds * 1e3,
                    "tflops": flops / seconds / 1e12,
                    "count_per_step": count,
                }
            )
            total_flops += flops * count
            total_seconds += seconds * count
        del x, w, dy
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "gemms": entries,
        "ceiling_tflops": total_flops / total_seconds / 1e12,
        "gemm_seconds_per_step": total_seconds,
    }
