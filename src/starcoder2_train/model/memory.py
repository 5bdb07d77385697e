"""Peak GPU memory per device for a recipe (`--dry_run true`, `gradient_checkpointing_layers: auto`).

The estimate is of `torch.cuda.max_memory_allocated`, what the device check measures: tensors only, not the CUDA
context or the allocator's cached-but-free blocks (1-3 GB more in `nvidia-smi`). GB = 1e9 bytes. It models the
precision path, ZeRO stage and offload, the attention kernel, the loss kernel, the micro batch and which layers
are checkpointed; tests/fixtures/gpu_memory_peaks.json holds the peaks measured on GPUs, and
tests/test_model_utils.py keeps every one of them within 10% of this estimate.

Model states, bytes per parameter (N = GPUs sharing the states under ZeRO):
- `deepspeed_bf16` (the recipes: DeepSpeed bf16 with `data_types.grad_accum_dtype: fp32`): bf16 weights 2,
  fp32 master weights 4 and Adam moments 8. Gradients: ZeRO-1 runs DeepSpeed's BF16_Optimizer, which keeps
  the bf16 gradients (2) and a full fp32 accumulation buffer (4) on every GPU; ZeRO-2 and -3 keep only their
  fp32 partition (4/N). ZeRO-1 and -2 partition master and moments (12/N); ZeRO-3 also the weights (2/N) and
  adds the gathered layers (two decoder layers in bf16, prefetch included). DeepSpeed allocates its gradient
  buffers once: they are part of every step's peak. Offload moves master, moments and fp32 gradient
  partitions to CPU memory (`cpu_gb`), `offload_param` the weights too.
- `autocast_fp32` (no DeepSpeed, `bf16: true` over float32 weights: a notebook, DDP): fp32 weights 4, fp32
  gradients 4, Adam 8, plus autocast's bf16 copy of every matmul weight (2), which lives until the forward
  ends and, for a layer that is not checkpointed, until its backward. The Trainer frees the gradients at each
  optimizer step, so with one micro batch per step only lm_head's exist at the start of the backward (the
  activations shrink faster than the gradients grow); with accumulation they all exist.
- `deepspeed_fp32` (DeepSpeed with `bf16: false`): fp32 weights 4 (they are the master weights), gradients 4
  (4/N from ZeRO-2), Adam 8 (8/N from ZeRO-1), and every activation in fp32 (twice the bytes below).
- `fsdp_bf16` (accelerate_configs/fsdp.yaml): fp32 weights, gradients and Adam sharded (16/N), plus two
  gathered decoder layers in bf16.

Activations kept for the backward, per token and decoder layer (h hidden, i intermediate, g = kv heads/heads),
in bf16 except where autocast keeps fp32: LayerNorm-1 input r (the residual stream: 2h bf16, 4h fp32 under
autocast), its output 2h, queries 2h, keys and values 4h·g, attention output 2h, LayerNorm-2 input r, its
output 2h, c_fc output 2i, GELU output 2i, and with residual dropout two 1-byte masks (2h). For flash kernels
(sdpa_varlen, flash_attention_2, flex_attention) that is all; sdpa with transformers' s×s mask (packed rows
without sdpa_varlen, or seq_length >= sliding_window) adds keys/values repeated to every query head and a bf16
copy of the mask per layer (2·s² per sequence); sdpa_blocked adds its block masks (s × (block + window) bytes
per sequence) and the repeated keys/values; eager the fp32 softmax and its bf16 copy (6·heads·s²).
A checkpointed layer keeps only its input r; in the backward one layer is rebuilt at a time. The final
LayerNorm keeps r + 2h, the embedding dropout a 1-byte mask (h).

Loss, per token of the micro batch (V vocabulary): `transformers` keeps bf16 logits and fp32 log-probabilities,
and at the start of the backward their fp32 and bf16 gradients: 12·V. `chunked` does that for one chunk of
`loss_chunk_size` tokens at a time. `liger` keeps the gradient of the hidden states (2h per token) and of
lm_head (bf16 V×h) from its forward, plus one chunk's logits (fp32 and bf16, 6·V per token of a chunk of
tokens ÷ ceil(V / h)). `cut_cross_entropy` keeps one fp32 log-sum-exp per token.
"""

import math

from starcoder2_train.configs import RecipeError

GB = 1e9
PRECISIONS = ("deepspeed_bf16", "deepspeed_fp32", "autocast_fp32", "fsdp_bf16")
FLASH_KERNELS = ("flash_attention_2", "sdpa_varlen", "flex_attention")
ATTENTION_MODELS = (*FLASH_KERNELS, "sdpa", "sdpa_blocked", "eager")
LOSS_MODELS = ("transformers", "chunked", "liger", "cut_cross_entropy")
GATHERED_LAYERS = 2  # ZeRO-3 / FSDP: the layer being computed and the one prefetched


def layer_widths(config) -> tuple[int, int, int, int]:
    """(hidden, intermediate, query, key/value) widths of one decoder layer's projections."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    return h, config.intermediate_size, config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim


def layer_matrix_parameters(config) -> int:
    """Parameters of one decoder layer's weight matrices (q, k, v, o, c_fc, c_proj): what Muon steps."""
    h, i, q, kv = layer_widths(config)
    return h * q + 2 * h * kv + q * h + 2 * h * i


def layer_parameters(config) -> int:
    """Parameters of one decoder layer (matmul weights and biases, both LayerNorms)."""
    h, i, q, kv = layer_widths(config)
    biases = q + 2 * kv + h + i + h if getattr(config, "use_bias", True) else 0
    return layer_matrix_parameters(config) + biases + 4 * h


def model_state_bytes(
    num_params: int, layer_params: int, precision: str, zero_stage: int, num_gpus: int, muon_params: int = 0
) -> dict:
    """Bytes per GPU of weights, gradients and optimizer states (master weights + Adam moments).

    `muon_params`: parameters stepped by Muon (`muon: true`, never sharded: it runs without ZeRO and FSDP), which
    keep one fp32 momentum buffer instead of Adam's two moments.
    """
    n = num_gpus
    if precision == "deepspeed_bf16":
        weights = 2 * num_params / (n if zero_stage == 3 else 1)
        if zero_stage == 3:
            weights += GATHERED_LAYERS * 2 * layer_params
        gradients = (2 + 4) * num_params if zero_stage <= 1 else 4 * num_params / n
        optimizer = 12 * num_params / (n if zero_stage >= 1 else 1)
    elif precision == "deepspeed_fp32":  # DeepSpeed without bf16: the weights are the master weights
        weights = 4 * num_params / (n if zero_stage == 3 else 1)
        if zero_stage == 3:
            weights += GATHERED_LAYERS * 4 * layer_params
        gradients = 4 * num_params / (n if zero_stage >= 2 else 1)
        optimizer = 8 * num_params / (n if zero_stage >= 1 else 1)
    elif precision == "autocast_fp32":
        weights = 4 * num_params / (n if zero_stage == 3 else 1)
        gradients = 4 * num_params / (n if zero_stage >= 2 else 1)
        optimizer = 8 * num_params / (n if zero_stage >= 1 else 1)
    elif precision == "fsdp_bf16":
        weights = 4 * num_params / n + GATHERED_LAYERS * 2 * layer_params
        gradients = 4 * num_params / n
        optimizer = 8 * num_params / n
    else:
        raise RecipeError(f"precision: {precision!r} has no memory model; one of {', '.join(PRECISIONS)}.")
    optimizer -= 4 * muon_params
    return {"weights": weights, "gradients": gradients, "optimizer_states": optimizer}


def activation_bytes_per_token_and_layer(config, attention: str, seq_length: int, masked: bool, fp32_residual: bool):
    """(bytes per token kept by one decoder layer, bytes per sequence that grow with s², residual stream bytes)."""
    h, i, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    g = config.num_key_value_heads / heads
    r = 4 * h if fp32_residual else 2 * h
    dropout_masks = 2 * h if getattr(config, "residual_dropout", 0.0) > 0 else 0
    per_token = 2 * r + 2 * h + 2 * h + 4 * h * g + 2 * h + 2 * h + 4 * i + dropout_masks
    window = getattr(config, "sliding_window", None)
    per_sequence = 0
    if attention == "eager":
        per_token += 4 * h * (1 - g)
        per_sequence = 6 * heads * seq_length**2
    elif attention == "sdpa" and masked:
        per_token += 4 * h * (1 - g)
        per_sequence = 2 * seq_length**2
    elif attention == "sdpa_blocked":
        block = min(window or seq_length, 1024)
        per_token += 4 * h * (1 - g)
        per_sequence = seq_length * (block + min(window or seq_length, seq_length))
    return per_token, per_sequence, r


def loss_bytes(config, tokens: int, loss_kernel: str, loss_chunk_size: int) -> float:
    """Bytes the training loss holds at its peak for `tokens` tokens of one micro batch."""
    h, vocab = config.hidden_size, config.vocab_size
    if loss_kernel == "transformers":
        return 12 * vocab * tokens
    if loss_kernel == "chunked":
        return 12 * vocab * min(tokens, loss_chunk_size or tokens)
    if loss_kernel == "liger":
        chunk = math.ceil(tokens / math.ceil(vocab / h))
        return 2 * h * tokens + 2 * vocab * h + 6 * vocab * chunk
    if loss_kernel == "cut_cross_entropy":
        return 4 * tokens
    raise RecipeError(f"loss_kernel: {loss_kernel!r} has no memory model; one of {', '.join(LOSS_MODELS)}.")


def estimate_memory_per_gpu(
    config,
    num_params: int,
    *,
    micro_batch_size: int,
    seq_length: int,
    precision: str = "deepspeed_bf16",
    zero_stage: int = 0,
    num_gpus: int = 1,
    gradient_accumulation_steps: int = 1,
    checkpointed_layers: int = 0,
    attn_implementation: str = "sdpa_varlen",
    cross_document_attention: bool = False,
    loss_kernel: str = "transformers",
    loss_chunk_size: int = 0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    muon_params: int = 0,
) -> dict:
    """GPU memory per device in GB at the peak of a training step (see the module's docstring for the model).

    Returns weights, gradients, optimizer_states, activations, loss, autocast_copies (bf16 copies of fp32 weights
    under autocast) and `total`, the peak of the larger of two moments: the end of the forward (every autocast
    copy alive) and the start of the backward (the loss's gradients alive); `cpu_gb` is what offload moves to
    CPU memory, left out of `total`.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise RecipeError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage}.")
    if min(num_gpus, micro_batch_size, seq_length, gradient_accumulation_steps) < 1:
        raise RecipeError("num_gpus, micro_batch_size, seq_length, gradient_accumulation_steps: must be positive.")
    if attn_implementation not in ATTENTION_MODELS:
        raise RecipeError(
            f"attn_implementation: {attn_implementation!r} has no memory model; resolve 'auto' with "
            "choose_attention on the training machine."
        )
    layers = config.num_hidden_layers
    if not 0 <= checkpointed_layers <= layers:
        raise RecipeError(f"gradient_checkpointing_layers: must be in [0, {layers}], got {checkpointed_layers}.")
    h, tokens = config.hidden_size, micro_batch_size * seq_length
    per_layer_params = layer_parameters(config)
    states = model_state_bytes(num_params, per_layer_params, precision, zero_stage, num_gpus, muon_params)
    cpu = 0.0
    if offload_optimizer and precision == "deepspeed_bf16":
        moved = states["optimizer_states"] + (4 * num_params / num_gpus if zero_stage >= 2 else 0)
        states["optimizer_states"] = 0.0
        states["gradients"] -= 4 * num_params / num_gpus if zero_stage >= 2 else 0
        cpu += moved
    if offload_params and zero_stage == 3:
        cpu += states["weights"] - GATHERED_LAYERS * 2 * per_layer_params
        states["weights"] = GATHERED_LAYERS * 2 * per_layer_params
    autocast = precision == "autocast_fp32"
    if autocast and gradient_accumulation_steps == 1:
        # The Trainer frees gradients at each step; at the backward's start only lm_head's exist (fp32).
        states["gradients"] = min(states["gradients"], 4 * config.vocab_size * h)

    window = getattr(config, "sliding_window", None)
    masked = not cross_document_attention or (window is not None and seq_length >= window)
    per_token, per_sequence, residual = activation_bytes_per_token_and_layer(
        config, attn_implementation, seq_length, masked, autocast
    )
    if precision == "deepspeed_fp32":  # every activation in fp32: twice the bf16 bytes
        per_token, residual = 2 * per_token, 2 * residual
    kept = layers - checkpointed_layers
    per_layer = tokens * per_token + micro_batch_size * per_sequence
    activations = kept * per_layer + checkpointed_layers * tokens * residual
    activations += tokens * (residual + 2 * h) + (tokens * h if getattr(config, "embedding_dropout", 0) > 0 else 0)
    rebuilt = per_layer if checkpointed_layers else 0.0  # in the backward, once the kept layers are freed
    loss = loss_bytes(config, tokens, loss_kernel, loss_chunk_size)

    copies_all = copies_kept = 0.0
    if autocast:
        matmuls = per_layer_params - 4 * h
        copies_all = 2 * (layers * matmuls + config.vocab_size * h)
        copies_kept = 2 * (kept * matmuls + config.vocab_size * h)
    base = sum(states.values())
    forward_end = base + activations + copies_all + (loss if loss_kernel == "liger" else 0.0)
    backward_start = base + activations + copies_kept + loss
    late = base + checkpointed_layers * tokens * residual + rebuilt + copies_kept
    result = {key: value / GB for key, value in states.items()}
    result.update(
        activations=activations / GB,
        loss=loss / GB,
        autocast_copies=copies_all / GB,
        total=max(forward_end, backward_start, late) / GB,
        cpu_gb=cpu / GB,
    )
    return result


def checkpointed_layers_to_fit(config, num_params: int, budget_gb: float, **plan) -> int | None:
    """The fewest decoder layers to checkpoint so that `estimate_memory_per_gpu(**plan)` fits `budget_gb`; None
    when even every layer checkpointed does not fit. Each layer left out saves recomputing its forward."""
    for layers in range(config.num_hidden_layers + 1):
        if estimate_memory_per_gpu(config, num_params, checkpointed_layers=layers, **plan)["total"] <= budget_gb:
            return layers
    return None
