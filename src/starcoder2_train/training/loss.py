"""Chunked cross-entropy: the causal-LM loss without the logits of the whole batch in memory.

transformers' loss computes `lm_head` over every position, upcasts the logits to fp32 and keeps them for
the backward: for one 16,384-token sequence and StarCoder2's 49,152-token vocabulary that is 3.2 GB of
fp32 logits, plus the bf16 logits and both gradients at the start of the backward (12 bytes × vocab per
token in all). Here the final hidden states are cut into chunks of `chunk_size` positions; each chunk's
logits and cross-entropy are computed under activation checkpointing, so that only the chunk's input
(a view of the hidden states) is kept, and the backward recomputes the chunk's logits. At most one chunk
of logits exists at a time, forward or backward. The price is one more `lm_head` forward per token
(2·vocab·hidden FLOPs, about 1.5% of StarCoder2-3B's training FLOPs).

`lm_head` is called as a module for every chunk, so that the hooks that DeepSpeed ZeRO-3 puts on modules
(to gather sharded weights) fire, and autocast (bf16 mixed precision) applies as usual. The result equals
transformers' `ForCausalLMLoss`: labels shifted left by one, positions labelled -100 ignored, summed and
divided by `num_items_in_batch` when the Trainer gives it (gradient accumulation), else averaged.
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from starcoder2_train.data.special_tokens import IGNORE_INDEX


def _chunk_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy of `lm_head(hidden_states)` against `labels`, `chunk_size` positions at a time.

    hidden_states: (batch, seq, hidden), the decoder's output after its final norm. labels: (batch, seq),
    -100 where no loss is taken; shifted here as transformers does (or give `shift_labels` already shifted).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be at least 1, got {chunk_size}.")
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.size(-1))
    targets = shift_labels.reshape(-1).to(hidden.device)
    chunk_loss = functools.partial(_chunk_loss_sum, lm_head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_size):
        end = start + chunk_size
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False)
        else:
            total = total + chunk_loss(hidden[start:end], targets[start:end])
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def enable_chunked_loss(model: nn.Module, chunk_size: int) -> nn.Module:
    """Make `model` (a transformers *ForCausalLM) compute its training loss with `chunked_causal_lm_loss`.

    The instance's `forward` is replaced (the class, its weights and `save_pretrained` are untouched): in
    training mode with labels it runs the decoder, then the chunked loss, and returns the loss without
    logits; in eval mode or without labels it is the original forward. `disable_chunked_loss` undoes it.
    """
    if chunk_size < 1:
        raise ValueError(f"loss_chunk_size: must be at least 1 to chunk the loss, got {chunk_size}.")
    disable_chunked_loss(model)
    original_forward = model.forward
    decoder = getattr(model, model.base_model_prefix)

    def forward(
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        # Only arguments given are passed on (transformers warns about some that are passed even as None).
        given = {
            key: value
            for key, value in (
                ("past_key_values", past_key_values),
                ("inputs_embeds", inputs_embeds),
                ("use_cache", use_cache),
            )
            if value is not None
        }
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **given)
        if labels is None or not model.training:
            return original_forward(**inputs, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = decoder(**inputs, **kwargs)
        loss = chunked_causal_lm_loss(
            outputs.last_hidden_state,
            model.get_output_embeddings(),
            labels,
            chunk_size,
            num_items_in_batch=num_items_in_batch,
            shift_labels=shift_labels,
        )
        return CausalLMOutputWithPast(loss=loss)  # training keeps no cache

    forward.chunked_loss_chunk_size = chunk_size
    model.forward = forward
    return model


def disable_chunked_loss(model: nn.Module) -> nn.Module:
    """Restore the class's forward after `enable_chunked_loss`."""
    if hasattr(model.__dict__.get("forward"), "chunked_loss_chunk_size"):
        del model.forward
    return model
