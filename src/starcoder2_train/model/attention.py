"""Attention that keeps packed documents apart without building an s×s mask.

A packed row holds several documents; `position_ids` restart at 0 where a document starts (data/packing.py),
and a query may attend only to keys of its own document, causally, within `sliding_window`. transformers
builds that as a full (batch, 1, s, s) mask for sdpa (one per layer, kept for the backward: about 16 GB at
16k for StarCoder2-3B) and computes every score of it; flash_attention_2 needs the flash-attn package.
Two implementations registered with transformers' `AttentionInterface` do without:

- `sdpa_varlen` (CUDA): the FlashAttention-2 kernels that PyTorch ships (`aten::_flash_attention_forward`,
  the kernel behind sdpa's flash backend) in their variable-length form: the batch is one stream of
  tokens cut at `cu_seq_lens` (cumulative document lengths), as flash-attn's `flash_attn_varlen_func`.
  Sliding window, grouped-query attention and dropout are done by the kernel; nothing is masked or
  computed outside a document's window. `data.collators.DocumentBoundaryCollator` computes `cu_seq_lens` on the CPU,
  so the GPU never waits for them (without it, each layer derives them from `position_ids`).
- `sdpa_blocked` (any device): queries in blocks (256 positions on a CPU, 1024 on a GPU); a block attends,
  through sdpa with a small mask, only to the keys its window can reach. The work grows with s·(block + window)
  instead of s², and each layer keeps masks of block × (block + window) instead of s × s.

Packed training needs no mask: PackedDataset pads only the end of a row, where causality keeps the padding
away from real tokens, and its positions restart like a new document's. When transformers does need a
mask (a padding `attention_mask`, as in batched generation, or a KV cache), the registered mask function
builds sdpa's, and both functions hand the call to transformers' sdpa.
"""

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from starcoder2_train.configs import SDPA_BLOCKED, SDPA_VARLEN
from starcoder2_train.data.collators import document_boundaries, document_ids


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return query.dtype


def _varlen_reference(query, key, value, cu_seq_lens, dropout, scale, window_left):
    """What the flash kernel computes, with sdpa one document at a time: for CPU tests, not for speed."""
    outputs = []
    for begin, end in zip(cu_seq_lens[:-1].tolist(), cu_seq_lens[1:].tolist()):
        q, k, v = (t[begin:end].transpose(0, 1) for t in (query, key, value))  # (heads, length, dim)
        positions = torch.arange(end - begin, device=query.device)
        allowed = positions[None, :] <= positions[:, None]
        if window_left >= 0:
            allowed &= positions[:, None] - positions[None, :] <= window_left
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale, enable_gqa=True
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


@torch.compiler.disable  # compiled layers break the graph here: document lengths change with every batch
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
    **kwargs,
):
    """transformers attention function: (batch, heads, seq, dim) inputs → ((batch, seq, heads, dim), None)."""
    if attention_mask is not None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    batch, heads, seq, dim = query.shape
    if cu_seq_lens_q is None:
        if position_ids is None:
            position_ids = torch.arange(seq, device=query.device).expand(batch, seq)
        boundaries = document_boundaries(position_ids)  # waits for the GPU: prefer DocumentBoundaryCollator
        cu_seq_lens_q, max_length_q = boundaries["cu_seq_lens_q"], boundaries["max_length_q"]
    # The kernel wants (tokens, heads, dim) in fp16/bf16; under autocast the rotary embedding may have
    # promoted queries and keys to fp32 (it multiplies by fp32 cos/sin), so cast to autocast's dtype.
    dtype = _compute_dtype(query)
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim).to(dtype) for t in (query, key, value))
    window_left = sliding_window - 1 if sliding_window is not None and sliding_window < max_length_q else -1
    if query.device.type == "cuda":
        out = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            cu_seq_lens_q,
            cu_seq_lens_q,
            max_length_q,
            max_length_q,
            dropout,
            True,
            False,
            scale=scaling,
            window_size_left=window_left if window_left >= 0 else None,
            window_size_right=0 if window_left >= 0 else None,
        )[0]
    else:
        out = _varlen_reference(q, k, v, cu_seq_lens_q, dropout, scaling, window_left)
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
    if attention_mask is not None or key.shape[2] != query.shape[2]:
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


def register_attention() -> None:
    """Make `sdpa_varlen` and `sdpa_blocked` valid `attn_implementation` names for transformers models."""
    for name, function in ((SDPA_VARLEN, varlen_attention_forward), (SDPA_BLOCKED, blocked_sdpa_attention_forward)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, mask_only_when_needed)


register_attention()
