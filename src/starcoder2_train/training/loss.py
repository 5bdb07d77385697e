"""The training loss without the logits of the whole batch in memory: chunked, Liger-Kernel or Cut Cross-Entropy.

transformers' loss computes `lm_head` over every position, upcasts the logits to fp32 and keeps them for
the backward: for one 16,384-token sequence and StarCoder2's 49,152-token vocabulary that is 3.2 GB of
fp32 logits, plus the bf16 logits and both gradients at the start of the backward (12 bytes × vocab per
token in all). The recipe key `loss_kernel` (`resolve_loss_kernel`) picks what replaces it:

- `chunked` (any device, plain PyTorch): the final hidden states are cut into chunks of `loss_chunk_size`
  positions; each chunk's logits and cross-entropy run under activation checkpointing, so that only the
  chunk's input (a view of the hidden states) is kept and the backward recomputes the chunk's logits. At
  most one chunk of logits exists at a time. Price: one more `lm_head` forward per token (2·vocab·hidden
  FLOPs, about 1.5% of StarCoder2-3B's training FLOPs).
- `liger` (CUDA, `liger_kernel.transformers.functional.liger_fused_linear_cross_entropy`): chunks internally
  (about tokens × hidden logits at a time) and computes the gradients of the hidden states and of the weight
  *in the forward*; it keeps those instead of any logits, and the backward only scales them. No extra
  `lm_head` forward. The weight's gradient is summed over the chunks in fp32 (`accum_dtype`; 0.6 GB at 3B)
  and then cast to the weight's dtype, the compute dtype: kept and handed on in bf16 (0.3 GB), rounded once
  per micro batch like every linear layer's weight gradient under bf16 autocast or DeepSpeed bf16, and summed
  across micro batches in fp32 (master gradients). No upcast: fp32 out would take an fp32 weight and matmuls.
- `cut_cross_entropy` (CUDA, `cut_cross_entropy.linear_cross_entropy`): no logits in GPU memory at all,
  forward or backward (blockwise in SRAM); keeps the hidden states, the weight and one log-sum-exp per token.
  Its backward skips softmax blocks below 2^-12 (bf16), a deviation `check_loss_kernel` measures.

Host syncs (liger-kernel 0.8.5, cut-cross-entropy 25.1.1): `chunked` and the code here read no device value
(tests/test_loss.py counts). The fused kernels wait for the GPU inside the library, whatever the arguments:
liger twice per micro batch, `.item()` of the count of targets that are not -100 (any reduction) in
ops/fused_linear_cross_entropy.py:fused_linear_cross_entropy_forward and `torch.equal(grad_output, 1.0)` in
:fused_linear_cross_entropy_backward; cut_cross_entropy once, `nonzero()` of that mask in
utils.py:_build_flat_valids, called by cce.py:cce_linear_cross_entropy (only its internal Function skips it).
Each drains the stream (the host waits for the queued work, at the forward's the whole decoder forward) and
the GPU idles until the next launch: tens of microseconds against about a second per 16k-token micro batch
at 3B (estimated from the code, not measured); more where the host is not far ahead. `auto` keeps liger
first: chunked recomputes lm_head, 1.5% of the FLOPs, far more than that.

One forward wrapper (`enable_training_loss`) serves all three; only the loss function differs. Label
shifting, flattening, -100 handling and the normalisation are shared (`shift_targets`, `normalise_loss`),
so the fused path equals transformers' `ForCausalLMLoss`: labels shifted left by one (or `shift_labels` as
given), -100 ignored, summed and divided by `num_items_in_batch` when the Trainer gives it (gradient
accumulation), else averaged. The fused kernels run with reduction "sum" and get the hidden states and the
weight in the compute dtype: the autocast dtype under bf16 mixed precision, else as the model holds them.

DeepSpeed ZeRO-3: `lm_head` is always called as a module. Its weight is partitioned (empty) outside its
module's forward, and the fused kernels take the weight tensor itself, so the kernel runs *inside* `lm_head`'s
own call (`_call_as_module` swaps its forward for that one call): DeepSpeed's module hooks gather the weight
for that call and again before its backward, where Cut Cross-Entropy reads it a second time. No copy is kept.
(A `GatheredParameters` context around the forward alone releases it before that backward; reading the
weight outside lm_head leans on DeepSpeed's eager-only external-parameter getter, which keeps it gathered for
the rest of the model's forward.) `check_loss_kernel`, run before DeepSpeed wraps the model, gathers
(`gathered`, only parameters with a `ds_id`) just long enough to copy the weight.
"""

import contextlib
import functools
import importlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from starcoder2_train.configs import LOSS_KERNELS, RecipeError
from starcoder2_train.data.special_tokens import IGNORE_INDEX

# kernel -> (module holding its function, the function, the PyPI package that provides it)
FUSED_KERNELS = {
    "liger": ("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy", "liger-kernel"),
    "cut_cross_entropy": ("cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy"),
}
# Relative errors check_loss_kernel accepts, against transformers' loss in fp32: (loss, gradients).
# fp32 allows for TF32 matmuls in Triton kernels; bf16 is about 10x what the chunked path measures (~4e-3).
TOLERANCES = {torch.float32: (1e-4, 1e-2), torch.bfloat16: (5e-3, 5e-2), torch.float16: (2e-3, 2e-2)}


def _vendor_function(kernel: str):
    """The fused kernel's function, or None when its package does not import (costs one import)."""
    module_name, function_name, _ = FUSED_KERNELS[kernel]
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except ImportError:
        return None


def resolve_loss_kernel(requested: str, chunk_size: int, device_type: str) -> str:
    """The kernel `loss_kernel: requested` means on `device_type` (`auto` resolved); raises RecipeError if unusable.

    auto: liger on CUDA where liger-kernel imports, else cut_cross_entropy on CUDA where it imports, else
    chunked when `loss_chunk_size` > 0, else transformers (fused first despite their host syncs: see the module).
    transformers with `loss_chunk_size` > 0 is chunked (recipes that only set loss_chunk_size keep their
    meaning). Importing a package is the only cost.
    """
    if requested not in LOSS_KERNELS:
        raise RecipeError(f"loss_kernel: {requested!r} is not one of {', '.join(LOSS_KERNELS)}.")
    if requested == "auto":
        for kernel in FUSED_KERNELS:
            if device_type == "cuda" and _vendor_function(kernel) is not None:
                return kernel
        return "chunked" if chunk_size > 0 else "transformers"
    if requested == "transformers":
        return "chunked" if chunk_size > 0 else "transformers"
    if requested == "chunked" and chunk_size < 1:
        raise RecipeError("loss_kernel: chunked needs loss_chunk_size > 0 (e.g. 4096), or choose transformers.")
    if requested in FUSED_KERNELS:
        if device_type != "cuda":
            raise RecipeError(
                f"loss_kernel: {requested} runs Triton kernels on CUDA GPUs only, not on {device_type!r}; "
                "choose chunked (with loss_chunk_size) or transformers."
            )
        if _vendor_function(requested) is None:
            raise RecipeError(
                f"loss_kernel: {requested} needs `pip install {FUSED_KERNELS[requested][2]}` (the project's "
                "cuda extra); or choose auto, chunked or transformers."
            )
    return requested


def shift_targets(labels: torch.Tensor, shift_labels: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The flat next-token targets: `labels` shifted left by one with -100 last (or `shift_labels` as given)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return shift_labels.reshape(-1).to(device)


def normalise_loss(total: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """`total` (a sum over tokens) over `num_items_in_batch` when given, else over the targets that are not -100."""
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


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
    Memory: one chunk of logits; time: one more lm_head forward per token (the backward's recomputation).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be at least 1, got {chunk_size}.")
    hidden = hidden_states.reshape(-1, hidden_states.size(-1))
    targets = shift_targets(labels, shift_labels, hidden.device)
    chunk_loss = functools.partial(_chunk_loss_sum, lm_head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_size):
        end = start + chunk_size
        if torch.is_grad_enabled() and hidden.requires_grad:
            total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False)
        else:
            total = total + chunk_loss(hidden[start:end], targets[start:end])
    return normalise_loss(total, targets, num_items_in_batch)


def _liger_sum(function, hidden, weight, bias, targets):
    # fp32 sum of the weight's gradient over Liger's chunks (default: the weight's dtype); returned in the weight's.
    return function(
        hidden, weight, targets, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32
    )


def _cut_cross_entropy_sum(function, hidden, weight, bias, targets):
    if bias is not None:  # cut-cross-entropy 25.1 has no bias argument
        raise RecipeError("loss_kernel: cut_cross_entropy takes no lm_head bias; choose liger or chunked.")
    return function(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum", shift=False)


_CALLS = {"liger": _liger_sum, "cut_cross_entropy": _cut_cross_entropy_sum}


def _fused_head_forward(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, kernel_sum
) -> torch.Tensor:
    """lm_head's forward for one fused-loss call: the summed loss of its weight on `hidden` in the compute dtype."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    bias = lm_head.bias.to(dtype) if getattr(lm_head, "bias", None) is not None else None
    with torch.autocast(device_type, enabled=False):
        return kernel_sum(hidden.to(dtype), lm_head.weight.to(dtype), bias, targets)


def _call_as_module(module: nn.Module, forward, *args):
    """`module(*args)` with `forward(module, *args)` as its forward for this call: its hooks (ZeRO-3's) run around."""
    own = module.__dict__.get("forward")
    module.forward = functools.partial(forward, module)
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def fused_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None,
    kernel_sum,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy through `kernel_sum(hidden (N, H), weight (V, H), bias, targets (N,))`, a summed loss.

    The shared part of the fused kernels (shift, flatten, -100, normalisation, the call inside lm_head's own
    forward for ZeRO-3); `kernel_sum` is `functools.partial(_liger_sum, function)` or the like. Costs what the
    kernel costs; nothing here allocates more than the flat targets.
    """
    hidden = hidden_states.reshape(-1, hidden_states.size(-1))
    targets = shift_targets(labels, shift_labels, hidden.device)
    total = _call_as_module(lm_head, functools.partial(_fused_head_forward, kernel_sum=kernel_sum), hidden, targets)
    return normalise_loss(total, targets, num_items_in_batch)


def training_loss_function(kernel: str, chunk_size: int = 0):
    """`fn(hidden_states, lm_head, labels, num_items_in_batch=None, shift_labels=None)` computing `kernel`'s loss.

    chunked needs `chunk_size` >= 1; a fused kernel's package is imported here (RecipeError naming loss_kernel
    when it is missing).
    """
    if kernel == "chunked":
        if chunk_size < 1:
            raise RecipeError(f"loss_chunk_size: must be at least 1 to chunk the loss, got {chunk_size}.")
        return functools.partial(chunked_causal_lm_loss, chunk_size=chunk_size)
    if kernel not in FUSED_KERNELS:
        raise RecipeError(f"loss_kernel: no loss function for {kernel!r}; resolve it with resolve_loss_kernel.")
    function = _vendor_function(kernel)
    if function is None:
        raise RecipeError(f"loss_kernel: {kernel} needs `pip install {FUSED_KERNELS[kernel][2]}`; or choose chunked.")
    return functools.partial(fused_causal_lm_loss, kernel_sum=functools.partial(_CALLS[kernel], function))


def enable_training_loss(model: nn.Module, kernel: str, chunk_size: int = 0) -> nn.Module:
    """Make `model` (a transformers *ForCausalLM) compute its training loss with `kernel` (resolved, not auto).

    chunked, liger, cut_cross_entropy: the instance's `forward` is replaced (the class, its weights and
    `save_pretrained` are untouched): in training mode with labels it runs the decoder, then the kernel's
    loss, and returns the loss without logits; in eval mode or without labels it is the original forward.
    transformers: any replaced forward is removed and the model left as it is. `disable_training_loss`
    undoes it. Call it before DeepSpeed or accelerate wrap the model. Costs nothing until the forward.
    """
    disable_training_loss(model)
    if kernel == "transformers":
        return model
    loss_function = training_loss_function(kernel, chunk_size)
    if kernel == "cut_cross_entropy" and getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise RecipeError("loss_kernel: cut_cross_entropy takes no lm_head bias; choose liger or chunked.")
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
        loss = loss_function(
            outputs.last_hidden_state,
            model.get_output_embeddings(),
            labels,
            num_items_in_batch=num_items_in_batch,
            shift_labels=shift_labels,
        )
        return CausalLMOutputWithPast(loss=loss)  # training keeps no cache

    forward.training_loss_kernel = kernel
    if kernel == "chunked":
        forward.chunked_loss_chunk_size = chunk_size
    model.forward = forward
    return model


def disable_training_loss(model: nn.Module) -> nn.Module:
    """Restore the class's forward after `enable_training_loss`."""
    if hasattr(model.__dict__.get("forward"), "training_loss_kernel"):
        del model.forward
    return model


def enable_chunked_loss(model: nn.Module, chunk_size: int) -> nn.Module:
    """`enable_training_loss(model, "chunked", chunk_size)`: the loss `chunk_size` positions at a time."""
    return enable_training_loss(model, "chunked", chunk_size)


def disable_chunked_loss(model: nn.Module) -> nn.Module:
    """Restore the class's forward after `enable_chunked_loss` (or `enable_training_loss`)."""
    return disable_training_loss(model)


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions `parameter` (it has a `ds_id`; its data is empty outside its module)."""
    return hasattr(parameter, "ds_id")


def gathered(parameters):
    """A context in which the given parameters are whole: `deepspeed.zero.GatheredParameters(modifier_rank=None)`
    (read-only; an all-gather of each) for the ZeRO-3-partitioned ones, else nothing to do."""
    partitioned = [parameter for parameter in parameters if parameter is not None and is_partitioned(parameter)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm().clamp_min(torch.finfo(torch.float32).tiny))


def check_loss_kernel(
    model: nn.Module,
    kernel: str,
    chunk_size: int,
    device,
    dtype: torch.dtype | None = None,
    rows: int = 2,
    length: int = 64,
) -> dict[str, float]:
    """Compare `kernel`'s loss and its gradients (hidden states, lm_head weight) with transformers' loss in fp32.

    On `device`, for a random batch of `rows` × `length` positions (hidden states N(0, 1) in `dtype`: the
    autocast dtype of a bf16 mixed-precision run, default the lm_head weight's dtype; -100s in the labels;
    `num_items_in_batch` given), the kernel (through the same loss function as training) runs on a copy of
    lm_head's weight as the model holds it, the reference on fp32 copies. Returns the relative errors (norm
    of the difference over the norm of the reference); raises RecipeError naming loss_kernel when one exceeds
    `TOLERANCES` of `dtype`. transformers: nothing to compare ({}). Costs one copy of the lm_head weight
    (gathered first under ZeRO-3) plus an fp32 one, and rows × length × vocab fp32 logits: under a second on
    the CPU for the tiny model. Run it once before training, before DeepSpeed wraps the model.
    """
    if kernel == "transformers":
        return {}
    device = torch.device(device)
    loss_function = training_loss_function(kernel, chunk_size)
    lm_head = model.get_output_embeddings()
    bias = getattr(lm_head, "bias", None)
    with gathered([lm_head.weight, bias]):
        weight = lm_head.weight.detach().to(device, copy=True)
        bias = bias.detach().to(device, copy=True) if bias is not None else None
    vocab, hidden_size = weight.shape
    dtype = dtype or weight.dtype
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(rows, length, hidden_size, generator=generator, device=device).to(dtype)
    labels = torch.randint(0, vocab, (rows, length), generator=generator, device=device)
    labels[torch.rand(rows, length, generator=generator, device=device) < 0.2] = IGNORE_INDEX
    labels[-1, -(length // 8) :] = IGNORE_INDEX  # padding at the end of a row
    num_items_in_batch = int((labels[..., 1:] != IGNORE_INDEX).sum()) + 5  # as if accumulating another batch

    head = nn.Linear(hidden_size, vocab, bias=bias is not None, device="meta")
    head.weight = nn.Parameter(weight)
    if bias is not None:
        head.bias = nn.Parameter(bias)
    hidden_leaf = hidden.clone().requires_grad_()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != weight.dtype):
        loss = loss_function(hidden_leaf, head, labels, num_items_in_batch=num_items_in_batch)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden_leaf, head.weight))

    hidden32 = hidden.float().requires_grad_()
    weight32 = weight.float().requires_grad_()
    logits = nn.functional.linear(hidden32, weight32, bias.float() if bias is not None else None)
    expected = ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=num_items_in_batch)
    expected_hidden, expected_weight = torch.autograd.grad(expected, (hidden32, weight32))
    errors = {
        "loss": _relative_error(loss, expected),
        "grad_hidden_states": _relative_error(grad_hidden, expected_hidden),
        "grad_lm_head_weight": _relative_error(grad_weight, expected_weight),
    }
    loss_tolerance, grad_tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])
    limits = dict.fromkeys(errors, grad_tolerance) | {"loss": loss_tolerance}
    bad = {name: error for name, error in errors.items() if not error <= limits[name]}  # NaN fails too
    if bad:
        found = ", ".join(f"{name} {error:.2e}" for name, error in bad.items())
        raise RecipeError(
            f"loss_kernel: {kernel} disagrees with transformers' fp32 loss on {device} in {dtype}: relative "
            f"error {found} (tolerance loss {loss_tolerance:g}, gradients {grad_tolerance:g}). Choose "
            "loss_kernel: chunked or transformers, or another version of the kernel's package."
        )
    return errors
