"""Model FLOPs per token and model FLOPs utilization (MFU).

MFU = achieved model FLOP/s ÷ peak FLOP/s of the device, where "model FLOPs" are the FLOPs the
model needs in principle (Chowdhery et al., PaLM, appendix B): no recomputation from gradient
checkpointing, no padding, dense bf16 peak. Every figure says which attention convention it uses.
The MFU of a run is computed on every log line by training/throughput.py from these FLOPs and peaks.
"""

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, from NVIDIA's data sheets. Checked in order:
# the first substring found in the upper-cased device name wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # and GH200: the same GH100 compute as H100 SXM, more memory
    ("A100", 312e12),  # SXM and PCIe
)


def model_flops_per_token(config, seq_length: int, convention: str = "causal") -> float:
    """Training FLOPs (forward + backward) per token of a decoder such as Starcoder2: 6·N + 12·L·H·k.

    convention="causal": k is the exact average number of keys a query attends to, given the causal
    mask and `config.sliding_window`. convention="palm": k = seq_length, as PaLM and torchtitan count
    (the full s×s score matrix); it gives the larger, commonly published number.
    """
    # Derivation. A matmul of an (m×n) activation by an (n×p) weight costs 2·m·n·p FLOPs forward
    # (a multiply and an add per weight per token), and twice that backward (the gradient with
    # respect to the input, and with respect to the weight). Per token and per weight: 2 + 4 = 6.
    # Hence 6·N, where N counts the weights of the matmuls only:
    #   per layer: q_proj H·h, k_proj and v_proj h·(kv_heads·d) each (grouped-query attention: the
    #   keys and values have fewer heads), o_proj H·h, c_fc h·i, c_proj i·h; then lm_head V·h once.
    #   The input embedding is a lookup (no FLOPs): with tied weights, the shared matrix is counted
    #   once, as the output projection; untied, the embedding matrix is not counted.
    #   Biases, LayerNorms, GELU, RoPE and the softmax are O(h) per token, a rounding error: left out.
    # Attention itself has no weights. For each query, each attended key costs a dot product
    # q·k (2·d FLOPs per head) and a weighted sum of a value (2·d per head): 4·H FLOPs forward per
    # query-key pair over all heads (H = heads·d, the query heads count, not the kv heads), and
    # ×3 with the backward: 12·H per pair, per layer. With k keys per query on average: 12·L·H·k.
    # k for a causal mask over s positions: query i sees min(i+1, w) keys (transformers' window keeps
    # keys j with i-w < j <= i). Averaged over i in [0, s):
    #   no window (or w >= s): (1 + 2 + ... + s) / s = (s+1)/2
    #   window w < s:          (w(w+1)/2 + (s-w)·w) / s
    # Packed documents whose attention is cut at document boundaries attend to fewer keys still; the
    # convention counts the whole sequence, which is what the kernels see.
    num_layers = config.num_hidden_layers
    hidden_size = config.hidden_size
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
    query_size = num_heads * head_dim
    kv_size = config.num_key_value_heads * head_dim
    per_layer = (
        hidden_size * query_size
        + 2 * hidden_size * kv_size
        + query_size * hidden_size
        + 2 * hidden_size * config.intermediate_size
    )
    matmul_params = num_layers * per_layer + config.vocab_size * hidden_size

    if convention == "palm":
        keys = float(seq_length)
    elif convention == "causal":
        window = getattr(config, "sliding_window", None)
        if window is None or window >= seq_length:
            keys = (seq_length + 1) / 2
        else:
            keys = (window * (window + 1) / 2 + (seq_length - window) * window) / seq_length
    else:
        raise ValueError(f"convention: {convention!r} is not 'causal' or 'palm'.")
    return 6.0 * matmul_params + 12.0 * num_layers * query_size * keys


def peak_flops_for_device(name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s for a device name such as torch.cuda.get_device_name(); None if unknown."""
    if not name:
        return None
    upper = name.upper()
    for marker, peak in PEAK_BF16_FLOPS:
        if marker in upper:
            return peak
    return None
