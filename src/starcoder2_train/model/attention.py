"""Attention that keeps packed documents apart without building an s×s mask.

A packed row holds several documents; `position_ids` restart at 0 where a document starts (data/windows/packing.py),
and a query may attend only to keys of its own document, causally, within `sliding_window`. transformers
builds that as a full (batch, 1, s, s) mask for sdpa (one per layer, kept for the backward: about 16 GB at
16k for StarCoder2-3B) and computes every score of it; flash_attention_2 needs the flash-attn package.
Two implementations registered with transformers' `AttentionInterface` do without:

- `sdpa_varlen`: the operator `starcoder2_train::varlen_attention` (`torch.library.custom_op`, with a fake
  implementation and a backward that is a second operator), so that a compiled decoder layer
  (`compile_layers`) is one graph with the attention inside, not two graphs around it. On CUDA it runs the
  FlashAttention kernels PyTorch ships (`aten::_flash_attention_forward`/`_backward`, the kernels behind sdpa's
  flash backend) in their variable-length form: the batch is one stream of tokens cut at `cu_seq_lens`
  (cumulative document lengths), as flash-attn's `flash_attn_varlen_func`; sliding window, grouped-query
  attention and dropout are done by the kernel, and the backward replays the forward's dropout mask from its
  philox state. `torch.nn.attention.activate_flash_attention_impl` (model/flash.py, `flash_attention_impl`)
  routes those aten kernels to FlashAttention-3 or -4, so this operator follows. Other devices: a per-document
  sdpa reference, slowly. `data.batches.collators.DocumentBoundaryCollator` computes `cu_seq_lens` and the longest
  document (`max_length_q`) on the CPU, so the GPU never waits for them. The kernel's grid is
  ceil(max_length/128) × documents × heads blocks, so the longest document is passed: with the row width, 25
  documents of about 650 tokens at 16k and 24 heads leave about 73,000 blocks idle per call. A decoder pre-hook
  (`_mark_documents_dynamic`) gives a compiled layer the document count and the longest document as symbolic
  sizes: it compiles once for all batches. Without the collator each layer derives `cu_seq_lens` from
  `position_ids` (a host-device wait, and a graph break when compiled) and passes the row width instead.
- `sdpa_blocked` (any device): queries in blocks (256 positions on a CPU, 1024 on a GPU); a block attends,
  through sdpa with a small mask, only to the keys its window can reach. The work grows with s·(block + window)
  instead of s², and each layer keeps masks of block × (block + window) instead of s × s.

Packed training needs no mask: PackedDataset pads only the end of a row, where causality keeps the padding
away from real tokens, and its positions restart like a new document's. When transformers does need a
mask (a padding `attention_mask`, as in batched generation, or a KV cache), the registered mask function
builds sdpa's, and both functions hand the call to transformers' sdpa.

`varlen_reference` (sdpa one document at a time) is also what `model.factory.verify_attention` checks every
kernel against before training; model/dropout_check.py checks that the flash backward replays its dropout mask.
"""

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from starcoder2_train.configs import SDPA_BLOCKED, SDPA_VARLEN
from starcoder2_train.data.batches.collators import cumulative_lengths, document_ids


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return query.dtype


def _allowed(length: int, window_left: int, device) -> torch.Tensor:
    """(length, length) bool: causal, and at most `window_left` positions back unless it is negative."""
    positions = torch.arange(length, device=device)
    allowed = positions[None, :] <= positions[:, None]
    if window_left >= 0:
        allowed &= positions[:, None] - positions[None, :] <= window_left
    return allowed


def _documents(cu_seq_lens: torch.Tensor):
    """(begin, end) of each document, read to the CPU."""
    return zip(cu_seq_lens[:-1].tolist(), cu_seq_lens[1:].tolist())


def varlen_reference(query, key, value, cu_seq_lens, dropout, scale, window_left):
    """What the flash kernel computes, with sdpa one document at a time: for CPUs and checks, not for speed."""
    outputs = []
    for begin, end in _documents(cu_seq_lens):
        q, k, v = (t[begin:end].transpose(0, 1) for t in (query, key, value))  # (heads, length, dim)
        allowed = _allowed(end - begin, window_left, query.device)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale, enable_gqa=True
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def _varlen_reference_backward(grad_out, query, key, value, out, cu_seq_lens, scale, window_left):
    """The gradients of `varlen_reference` without dropout, written out per document in fp32.

    Autograd does not record inside an operator's kernel, so the softmax backward is spelled out: with P the
    probabilities, dV = Pᵀ·dO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K·scale, dK = dSᵀ·Q·scale; a key/value
    head's gradients are summed over the query heads that share it. Memory: heads × length² floats per document.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    groups = query.shape[1] // key.shape[1]
    grads = [torch.empty_like(t) for t in (query, key, value)]
    for begin, end in _documents(cu_seq_lens):
        q, do, o = (t[begin:end].transpose(0, 1).float() for t in (query, grad_out, out))  # (heads, length, dim)
        k, v = (t[begin:end].transpose(0, 1).float().repeat_interleave(groups, dim=0) for t in (key, value))
        scores = (q @ k.transpose(1, 2) * scale).masked_fill(~_allowed(end - begin, window_left, q.device), -torch.inf)
        p = scores.softmax(dim=-1)
        ds = p * (do @ v.transpose(1, 2) - (do * o).sum(dim=-1, keepdim=True))
        dq, dk, dv = ds @ k * scale, ds.transpose(1, 2) @ q * scale, p.transpose(1, 2) @ do
        dk, dv = (g.unflatten(0, (-1, groups)).sum(dim=1) for g in (dk, dv))
        for grad, part in zip(grads, (dq, dk, dv)):
            grad[begin:end] = part.transpose(0, 1)
    return tuple(grads)


def _kernel_state(query: torch.Tensor):
    """What the flash forward keeps for its backward, zeroed: logsumexp (heads, tokens) and the philox state."""
    tokens, heads, _ = query.shape
    return (
        query.new_zeros((heads, tokens), dtype=torch.float32),
        query.new_zeros(2, dtype=torch.uint64),
        query.new_zeros((), dtype=torch.uint64),
    )


def _window(window_left: int) -> dict:
    return {"window_size_left": window_left, "window_size_right": 0} if window_left >= 0 else {}


def _flash_forward(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
    """aten's flash forward, variable length and causal (FA2, or FA3/FA4 when activated) → the first four outputs."""
    out, logsumexp, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, dropout, True, False,
        scale=scale, **_window(window_left),
    )  # fmt: skip
    return out, logsumexp, seed, offset


def _flash_backward(
    grad_out, query, key, value, out, logsumexp, seed, offset, cu_seq_lens, max_length, dropout, scale, window_left
):
    """aten's flash backward of `_flash_forward` → the gradients of query, key and value."""
    return torch.ops.aten._flash_attention_backward(
        grad_out.contiguous(), query, key, value, out, logsumexp, cu_seq_lens, cu_seq_lens, max_length, max_length,
        dropout, True, seed, offset, scale=scale, **_window(window_left),
    )  # fmt: skip


@torch.library.custom_op("starcoder2_train::varlen_attention", mutates_args=())
def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    dropout: float,
    scale: float | None,
    window_left: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention within documents: (tokens, heads, dim) q and (tokens, kv_heads, dim) k, v, cut at the
    int32 `cu_seq_lens`; → (output, logsumexp, philox seed, philox offset), the last three for the backward.

    `max_length` must bound every document's length (the kernel sizes its grid by it: the longest document is
    exact, the row width is safe and slower); `window_left` ≥ 0 lets a query see that many earlier positions, -1
    all of them. CUDA: FlashAttention (2, or 3/4 when activated), O(tokens) memory. Other devices: sdpa per
    document, without dropout, and zeros for the kernel's state (the backward recomputes); a `max_length` shorter
    than a document is refused there, as the kernel would silently leave that document's tail out.
    """
    if query.device.type == "cuda":
        return _flash_forward(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left)
    if max_length < int(cu_seq_lens.diff().max()):
        raise ValueError(f"starcoder2_train::varlen_attention: max_length {max_length} is shorter than a document.")
    if dropout > 0:
        raise ValueError(
            "starcoder2_train::varlen_attention: dropout needs the CUDA kernel; on this device call "
            "varlen_attention_forward (it runs the eager reference for attention_dropout > 0) or use sdpa_blocked."
        )
    return varlen_reference(query, key, value, cu_seq_lens, 0.0, scale, window_left), *_kernel_state(query)


@varlen_attention.register_fake
def _(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
    # Shapes only (those of aten's flash forward); none depends on cu_seq_lens, whose length changes per batch.
    return torch.empty_like(query), *_kernel_state(query)


@torch.library.custom_op("starcoder2_train::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    dropout: float,
    scale: float | None,
    window_left: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `varlen_attention` for q, k, v (k and v with their own, fewer, heads).

    CUDA: the flash backward, which replays the forward's dropout from its philox seed and offset and recomputes
    the scores from `logsumexp`. Other devices: `_varlen_reference_backward`.
    """
    if query.device.type == "cuda":
        return _flash_backward(
            grad_out, query, key, value, out, logsumexp, seed, offset, cu_seq_lens, max_length, dropout, scale,
            window_left,
        )  # fmt: skip
    return _varlen_reference_backward(grad_out, query, key, value, out, cu_seq_lens, scale, window_left)


@varlen_attention_backward.register_fake
def _(grad_out, query, key, value, out, logsumexp, seed, offset, cu_seq_lens, max_length, dropout, scale, window_left):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _save_for_backward(ctx, inputs, output):
    query, key, value, cu_seq_lens, *options = inputs
    ctx.save_for_backward(query, key, value, *output, cu_seq_lens)
    ctx.options = options


def _varlen_backward(ctx, grad_out, *unused_grads):
    grads = varlen_attention_backward(grad_out, *ctx.saved_tensors, *ctx.options)
    return *grads, None, None, None, None, None


varlen_attention.register_autograd(_varlen_backward, setup_context=_save_for_backward)


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    position_ids=None,
    cu_seq_lens_q=None,
    max_length_q=None,
    max_length_carrier=None,
    **kwargs,
):
    """transformers attention function: (batch, heads, seq, dim) inputs → ((batch, seq, heads, dim), None).

    `varlen_attention` over the batch as one stream cut at `cu_seq_lens_q`; `max_length` is the longest document:
    `max_length_carrier.shape[0]` from the decoder's pre-hook (symbolic in a compiled layer), else the int
    `max_length_q` (a compiled layer recompiles once when it changes). Without `cu_seq_lens_q` they come from
    `position_ids` (a host-device wait) and the row width stands for the longest document, which costs
    ceil(seq/128) − ceil(longest/128) idle thread blocks per document and head, and in FA2's backward a documents
    × heads × seq fp32 scratch (100 documents, 24 heads, 4k: 39 MB). On a CPU with dropout: the eager reference.
    """
    if not _no_mask_needed(attention_mask) or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    batch, heads, seq, dim = query.shape
    if cu_seq_lens_q is None:
        if position_ids is None:
            position_ids = torch.arange(seq, device=query.device).expand(batch, seq)
        cu_seq_lens_q = cumulative_lengths(position_ids)  # waits: prefer DocumentBoundaryCollator
        max_length = seq
    elif max_length_carrier is not None:
        max_length = max_length_carrier.shape[0]
    else:
        max_length = seq if max_length_q is None else max_length_q
    # The kernel wants (tokens, heads, dim) in fp16/bf16; under autocast the rotary embedding may have
    # promoted queries and keys to fp32 (it multiplies by fp32 cos/sin), so cast to autocast's dtype.
    dtype = _compute_dtype(query)
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim).to(dtype) for t in (query, key, value))
    # A window at least as wide as the row limits nothing (nor does it a document shorter than the window).
    window_left = sliding_window - 1 if sliding_window is not None and sliding_window < seq else -1
    if dropout > 0 and query.device.type != "cuda":
        out = varlen_reference(q, k, v, cu_seq_lens_q, dropout, scaling, window_left)
    else:
        out = varlen_attention(q, k, v, cu_seq_lens_q, max_length, dropout, scaling, window_left)[0]
    return out.view(batch, seq, heads, dim), None


@torch.compiler.disable  # a Python loop over blocks: keep it out of compiled graphs
def blocked_sdpa_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    position_ids=None,
    block_size: int | None = None,
    **kwargs,
):
    """transformers attention function: sdpa over query blocks, each with the keys its window reaches."""
    if not _no_mask_needed(attention_mask) or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    batch, heads, seq, dim = query.shape
    window = sliding_window if sliding_window is not None and sliding_window < seq else None
    # Measured on a 2-core CPU (tiny model, window 512, 4k): blocks of 128-256 queries are fastest; on a GPU
    # fewer, larger calls are better. A block never needs to exceed the window.
    block = block_size or min(window or seq, 256 if query.device.type == "cpu" else 1024)
    if position_ids is None:
        position_ids = torch.arange(seq, device=query.device).expand(batch, seq)
    documents = document_ids(position_ids)
    dtype = _compute_dtype(query)
    query, key, value = (t.to(dtype) for t in (query, key, value))
    outputs = []
    for q_begin in range(0, seq, block):
        q_end = min(q_begin + block, seq)
        k_begin = max(0, q_begin - window + 1) if window else 0
        q_pos = torch.arange(q_begin, q_end, device=query.device)[:, None]
        k_pos = torch.arange(k_begin, q_end, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if window:
            allowed = allowed & (k_pos > q_pos - window)
        same_document = documents[:, q_begin:q_end, None] == documents[:, None, k_begin:q_end]
        mask = (allowed & same_document)[:, None]  # (batch, 1, block, keys)
        outputs.append(
            nn.functional.scaled_dot_product_attention(
                query[:, :, q_begin:q_end],
                key[:, :, k_begin:q_end],
                value[:, :, k_begin:q_end],
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=key.shape[1] != heads,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def mask_only_when_needed(*, q_length: int, kv_length: int, attention_mask=None, q_offset: int = 0, **kwargs):
    """transformers mask function: None for a full, uncached batch (the kernels mask by themselves), else sdpa's."""
    if attention_mask is None and q_length == kv_length and q_offset == 0:
        return None
    return sdpa_mask(
        q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, q_offset=q_offset, **kwargs
    )


def _no_mask_needed(attention_mask) -> bool:
    """None, or the empty 4D mask `skip_mask_building` passes: the kernels keep the documents apart themselves."""
    return attention_mask is None or (attention_mask.ndim == 4 and attention_mask.numel() == 0)


def _pass_packed_marker(module, args, kwargs):
    """Forward pre-hook of the decoder: in training, without a padding mask or cache, pass an empty 4D mask.

    transformers' `masking_utils` first checks whether position_ids without an attention_mask are packed
    (`find_packed_sequence_indices`: a `bool()` of a device tensor, a host-device sync per forward); a 4D mask is
    taken as given. This empty one means "no mask" to sdpa_varlen and sdpa_blocked, which cut at the documents.
    """
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed to cache in transformers 5.25
    if not module.training or kwargs.get("attention_mask") is not None or cache is not None:
        return args, kwargs
    if kwargs.get("use_cache") or (kwargs.get("use_cache") is None and module.config.use_cache):
        return args, kwargs
    if module.config._attn_implementation not in (SDPA_VARLEN, SDPA_BLOCKED):
        return args, kwargs
    reference = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if reference is None:
        return args, kwargs
    kwargs["attention_mask"] = torch.empty((reference.shape[0], 1, 0, 0), dtype=torch.bool, device=reference.device)
    return args, kwargs


def _mark_documents_dynamic(module, args, kwargs):
    """Forward pre-hook of the decoder: the document boundaries as sizes a compiled layer keeps symbolic.

    torch 2.13's dynamo (_dynamo/config.py: assume_static_by_default, automatic_dynamic_shapes) compiles a frame
    with every size and int argument a constant, and recompiles with one dynamic once it has changed: two
    compilations per layer. `maybe_mark_dynamic` makes a tensor's size symbolic from the first compilation; the
    mark lives on the tensor object, so it is made here, on the tensors as the model receives them on its device
    (a worker's mark is lost by pin_memory and `.to(device)`). An int can be made dynamic only by process-wide
    source names (torch.compiler.config.dynamic_sources), so the int `max_length_q` becomes `max_length_carrier`,
    an empty (max_length_q, 0) tensor: no memory, copy or sync (sizes are host metadata), and its `.shape[0]` is a
    symbolic int in the compiled layer, which the operator's schema takes (SymInt). cu_seq_lens has documents + 1
    ≥ 2 entries, so dynamo's specialisation of sizes 0 and 1 never applies to it (a longest document of 1 token
    would cost one more compilation). Not marked while dynamo traces the whole model (`torch_compile`).
    """
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if not torch.is_tensor(cu_seq_lens):
        return args, kwargs
    if isinstance(kwargs.get("max_length_q"), int) and kwargs.get("max_length_carrier") is None:
        kwargs["max_length_carrier"] = cu_seq_lens.new_empty((kwargs["max_length_q"], 0))
    if not torch.compiler.is_compiling():
        for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_carrier"):
            if torch.is_tensor(kwargs.get(name)):
                torch._dynamo.maybe_mark_dynamic(kwargs[name], 0)
    return args, kwargs


def skip_mask_building(model) -> None:
    """Install the decoder's pre-hooks for packed batches (once): `_pass_packed_marker` (no host-device sync per
    training forward) and `_mark_documents_dynamic` (a compiled layer compiles once for all batches)."""
    decoder = getattr(model, model.base_model_prefix, model)
    if not getattr(decoder, "_packed_marker_installed", False):
        decoder.register_forward_pre_hook(_pass_packed_marker, with_kwargs=True)
        decoder.register_forward_pre_hook(_mark_documents_dynamic, with_kwargs=True)
        decoder._packed_marker_installed = True


def register_attention() -> None:
    """Make `sdpa_varlen` and `sdpa_blocked` valid `attn_implementation` names for transformers models."""
    for name, function in ((SDPA_VARLEN, varlen_attention_forward), (SDPA_BLOCKED, blocked_sdpa_attention_forward)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, mask_only_when_needed)


register_attention()
