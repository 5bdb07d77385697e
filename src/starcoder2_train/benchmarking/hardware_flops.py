"""FLOPs the hardware runs per token, counting recomputation, beside the model FLOPs of model/flops.py.

Model FLOPs (MFU) count what the model needs in principle: 6·N + 12·L·H·k per token, no recomputation. The
device does more when memory is traded for compute:

- a gradient-checkpointed decoder layer runs its forward twice (once without keeping activations, once in
  the backward to rebuild them): + 2·P + 4·H·k per token, P = the layer's matmul weights, H = query heads
  times head size, k = keys a query attends to (the same k as the model FLOPs' convention);
- a loss that rebuilds the logits in its backward (the chunked loss of training/loss.py, and
  cut_cross_entropy) runs lm_head's forward twice: + 2·V·h per token. Liger's fused linear cross-entropy
  computes the gradients in its forward and recomputes nothing; transformers' loss keeps the logits.

`hardware_flops_per_token` adds these to `model_flops_per_token`; `throughput_figures` turns a run's useful
tokens/s into model TFLOP/s, MFU (causal and PaLM conventions) and hardware TFLOP/s. Pure arithmetic: no
device, no model is built.
"""

from starcoder2_train.model.flops import model_flops_per_token
from starcoder2_train.training.loss import resolve_loss_kernel


def layer_matmul_params(config) -> int:
    """Weights of one decoder layer's matmuls (q, k, v, o, c_fc, c_proj), as model/flops.py counts them."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    query_size = config.num_attention_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    hidden = config.hidden_size
    return hidden * query_size + 2 * hidden * kv_size + query_size * hidden + 2 * hidden * config.intermediate_size


def attention_forward_flops_per_layer(config, seq_length: int, convention: str = "causal") -> float:
    """4·H·k: one layer's attention forward per token (scores and weighted sum), k as in `convention`."""
    layers = config.num_hidden_layers
    matmul = layers * layer_matmul_params(config) + config.vocab_size * config.hidden_size
    attention_training = model_flops_per_token(config, seq_length, convention) - 6.0 * matmul  # 12·L·H·k
    return attention_training / (3.0 * layers)


def hardware_flops_per_token(
    config,
    seq_length: int,
    checkpointed_layers: int = 0,
    recompute_lm_head: bool = False,
    convention: str = "causal",
) -> float:
    """Training FLOPs per token the device runs: the model FLOPs plus the forwards it repeats.

    checkpointed_layers: decoder layers under gradient checkpointing (each adds 2·P + 4·H·k);
    recompute_lm_head: the loss rebuilds the logits in its backward (adds 2·V·h). With neither, this equals
    `model_flops_per_token(config, seq_length, convention)`.
    """
    layers = min(max(checkpointed_layers, 0), config.num_hidden_layers)
    per_layer_forward = 2.0 * layer_matmul_params(config) + attention_forward_flops_per_layer(
        config, seq_length, convention
    )
    lm_head_forward = 2.0 * config.vocab_size * config.hidden_size if recompute_lm_head else 0.0
    return model_flops_per_token(config, seq_length, convention) + layers * per_layer_forward + lm_head_forward


def checkpointed_layers(training_args, num_layers: int) -> int:
    """Decoder layers the run checkpoints: none without gradient_checkpointing, else the first
    gradient_checkpointing_layers (every layer when that key is unset)."""
    enabled = getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing
    if not enabled:
        return 0
    first = getattr(training_args, "gradient_checkpointing_layers", None)
    return num_layers if first is None else min(first, num_layers)


def loss_recomputes_logits(loss_kernel: str, loss_chunk_size: int, cuda: bool) -> bool:
    """Whether the training loss runs lm_head's forward a second time in the backward: chunked and
    cut_cross_entropy do; `auto` and `transformers` are resolved as training/loss.py resolves them here."""
    if loss_kernel in ("auto", "transformers"):
        loss_kernel = resolve_loss_kernel(loss_kernel, loss_chunk_size, "cuda" if cuda else "cpu")
    return loss_kernel in ("chunked", "cut_cross_entropy")


def throughput_figures(
    useful_tokens_per_second: float,
    config,
    seq_length: int,
    peak_flops: float | None,
    checkpointed: int = 0,
    recompute_lm_head: bool = False,
) -> dict:
    """Per device: model TFLOP/s and MFU with k causal and k = seq_length (PaLM), and hardware TFLOP/s and
    HFU counting recomputation, every useful token counted at the training context `seq_length`."""
    causal = model_flops_per_token(config, seq_length, "causal")
    palm = model_flops_per_token(config, seq_length, "palm")
    hardware = hardware_flops_per_token(config, seq_length, checkpointed, recompute_lm_head, "causal")
    figures = {
        "model_flops_per_token_causal": causal,
        "model_flops_per_token_palm": palm,
        "hardware_flops_per_token": hardware,
        "model_tflops_causal": useful_tokens_per_second * causal / 1e12,
        "model_tflops_palm": useful_tokens_per_second * palm / 1e12,
        "hardware_tflops": useful_tokens_per_second * hardware / 1e12,
    }
    if peak_flops:
        figures["mfu_causal_at_seq_length"] = useful_tokens_per_second * causal / peak_flops
        figures["mfu_palm"] = useful_tokens_per_second * palm / peak_flops
        figures["hfu"] = useful_tokens_per_second * hardware / peak_flops
    return figures
