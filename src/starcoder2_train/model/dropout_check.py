"""Does an attention kernel's backward replay its forward's dropout mask? A check that needs no access to the mask.

`verify_attention` (model/factory.py) compares kernels with dropout 0, where nothing tells whether the backward
of the flash kernel (sdpa_varlen on CUDA: aten's `_flash_attention_backward`, which regenerates the mask from the
forward's philox state) drops the same attention weights as the forward did. Two properties of attention with
dropout, per head: O = (D∘P/(1-p))·V, with P the softmax probabilities and D the 0/1 keep-mask, and a linear loss
L = <O, G> for a fixed random G (dO = G):

1. Mask replay. dV = (D'∘P/(1-p))ᵀ·G, where D' is the mask the backward uses, so <V, dV> = <(D'∘P/(1-p))·V, G>,
   which equals <O, G> when D' = D and differs by <((D'-D)∘P/(1-p))·V, G> otherwise. A key/value head's dV is
   summed over its group of query heads, so the identity holds per document and key/value head:
   Σ_{tokens of the document, heads of the group} O∘G = Σ_{tokens of the document} V∘dV.
   Rounding: O and dV are each rounded once to the kernel's dtype (relative error at most eps/2, and the
   probabilities are rounded to it inside both products in FlashAttention-2), independently across elements, so
   the two sums differ by a few times eps/2·sqrt(Σ(O∘G)² + Σ(V∘dV)²). The tolerance is REPLAY_SIGMAS·eps times
   that root-sum-square (16 times eps/2; a uniform rounding error's standard deviation is (eps/2)/√3). A mask that
   differs moves the sum by about sqrt(p/(1-p)·Σ_i Σ_j (P_ij·v_j·g_i)²). Measured on a CPU in bf16 at 3B's heads,
   dropout 0.1, DOCUMENTS (sdpa's own dropout as the kernel): 0.05 of the tolerance for the kernel, 12 times it
   when the backward draws another mask.
2. Expectation. dS = P∘(dP − rowsum(G∘O)) with dP = D'∘(G·Vᵀ)/(1-p) is linear in each mask, and E[D] = E[D'] =
   1-p, so dQ, dK and dV averaged over N draws estimate the no-dropout gradients. With s² the unbiased variance
   of an element over the draws, E[Σ(mean − reference)²] = Σ Var/N = E[Σ s²/N] for a correct kernel; the ratio
   Σ(mean − reference)² / (Σ s²/N + Σ(eps·reference)²) (the second term: the reference's own rounding) is then
   about 1 and passes up to EXPECTATION_RATIO. A backward that forgets the 1/(1-p) scale or drops a different
   share raises it by about N·bias²/variance.
The second property holds for any backward mask with the right distribution; the first is what catches a
backward that draws its own mask. A kernel whose outputs do not vary between draws applies no dropout and fails.

The kernel is pluggable: `kernel(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left)` with
(tokens, heads, dim) tensors returns the output, differentiable. The default is the flash operator of sdpa_varlen
(CUDA only: on other devices the operator has no dropout); `model.attention.varlen_reference` (sdpa per document,
whose autograd keeps its mask) passes on a CPU, and tests/test_dropout_check.py shows one that redraws fails.
"""

import torch

from starcoder2_train.configs import RecipeError
from starcoder2_train.model.attention import varlen_attention, varlen_attention_backward

REPLAY_SIGMAS = 8  # the replay tolerance, in units of eps × root-sum-square (see the module docstring)
EXPECTATION_RATIO = 2.0  # largest accepted ratio of squared error to its expected size (1 for a correct kernel)
DOCUMENTS = (1, 17, 128, 300, 555)  # the check's packed row: a one-token document up to several hundred tokens


def flash_kernel(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
    """sdpa_varlen's operator (FlashAttention on CUDA), output only."""
    return varlen_attention(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left)[0]


class _OtherMaskBackward(torch.autograd.Function):
    """The flash forward, then a backward that replays the philox state of a second forward: another mask."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
        out, logsumexp, _, _ = varlen_attention(
            query, key, value, cu_seq_lens, max_length, dropout, scale, window_left
        )
        _, _, seed, offset = varlen_attention(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left)
        ctx.save_for_backward(query, key, value, out, logsumexp, seed, offset, cu_seq_lens)
        ctx.options = (max_length, dropout, scale, window_left)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = varlen_attention_backward(grad_out, *ctx.saved_tensors, *ctx.options)
        return *grads, None, None, None, None, None


def flash_kernel_with_another_mask(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
    """A wrong kernel on purpose (CUDA): the control that shows the replay check can fail on the device."""
    return _OtherMaskBackward.apply(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left)


def _segment_sums(values: torch.Tensor, document_of_token: torch.Tensor, documents: int) -> torch.Tensor:
    """(tokens, kv_heads, n) → (documents, kv_heads): the sums of each document's tokens, in float64."""
    sums = values.double().sum(dim=-1)
    return sums.new_zeros(documents, sums.shape[1]).index_add_(0, document_of_token, sums)


def dropout_gradient_check(
    heads: int,
    kv_heads: int,
    dim: int,
    *,
    dropout: float,
    device,
    dtype: torch.dtype,
    documents=DOCUMENTS,
    window: int | None = None,
    draws: int = 32,
    kernel=flash_kernel,
    seed: int = 0,
) -> dict:
    """Run the two checks of the module docstring on one packed row of `documents` → a dict for a report.

    "mask_replay_ratio": the largest |<O, G> − <V, dV>| of any document, key/value head and draw over its
    tolerance (≤ 1 passes); "expectation_ratio": per gradient, the ratio of part 2 (≤ EXPECTATION_RATIO passes);
    "dropout_applied": whether the outputs differ between draws; "passed": all three. Cost: draws + 1 forward and
    backward passes over sum(documents) tokens (on an H100 at 3B's heads, about a millisecond each).
    """
    device = torch.device(device)
    lengths = torch.tensor(documents)
    cu_seq_lens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device, torch.int32)
    document_of_token = torch.repeat_interleave(torch.arange(len(documents)), lengths).to(device)
    tokens, groups = int(lengths.sum()), heads // kv_heads
    window_left = window - 1 if window is not None and window < max(documents) else -1
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    query, key, value = randn(tokens, heads, dim), randn(tokens, kv_heads, dim), randn(tokens, kv_heads, dim)
    grad_out = randn(tokens, heads, dim)
    scale, eps = dim**-0.5, torch.finfo(dtype).eps

    def forward_backward(p):
        inputs = [t.detach().requires_grad_() for t in (query, key, value)]
        out = kernel(*inputs, cu_seq_lens, max(documents), p, scale, window_left)
        out.backward(grad_out)
        return out.detach(), [t.grad.double() for t in inputs]

    _, reference = forward_backward(0.0)
    sums = [torch.zeros_like(g) for g in reference]
    squares = [torch.zeros_like(g) for g in reference]
    replay_ratio, first_out, varies = 0.0, None, False
    for _ in range(draws):
        out, grads = forward_backward(dropout)
        for total, square, grad in zip(sums, squares, grads):
            total += grad
            square += grad.square()
        first_out = out if first_out is None else first_out
        varies = varies or not torch.equal(out, first_out)
        og = (out.float() * grad_out.float()).view(tokens, kv_heads, groups * dim)
        vdv = value.float() * grads[2]
        difference = _segment_sums(og, document_of_token, len(documents)) - _segment_sums(
            vdv, document_of_token, len(documents)
        )
        spread = (
            _segment_sums(og.square(), document_of_token, len(documents))
            + _segment_sums(vdv.square(), document_of_token, len(documents))
        ).sqrt()
        tolerance = REPLAY_SIGMAS * eps * spread + torch.finfo(torch.float32).tiny
        replay_ratio = max(replay_ratio, float((difference.abs() / tolerance).max()))
    expectation = {}
    for name, total, square, exact in zip(("dq", "dk", "dv"), sums, squares, reference):
        mean = total / draws
        variance = ((square - draws * mean.square()) / (draws - 1)).clamp_min(0)
        expected = variance.sum() / draws + (eps * exact).square().sum()
        expectation[name] = float((mean - exact).square().sum() / expected.clamp_min(torch.finfo(torch.float32).tiny))
    passed = replay_ratio <= 1.0 and max(expectation.values()) <= EXPECTATION_RATIO and varies
    return {
        "dropout": dropout,
        "draws": draws,
        "documents": list(documents),
        "shape_heads_kv_heads_dim": [heads, kv_heads, dim],
        "dtype": str(dtype).removeprefix("torch."),
        "mask_replay_ratio": replay_ratio,
        "expectation_ratio": expectation,
        "dropout_applied": varies,
        "passed": passed,
    }


def require_dropout_replay(config, device, dtype: torch.dtype, window: int | None = None, kernel=flash_kernel) -> dict:
    """`dropout_gradient_check` at the model's head counts, head dim and `attention_dropout`, or a RecipeError that
    names attention_dropout when it fails (model.factory.verify_attention calls it for sdpa_varlen on CUDA)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    result = dropout_gradient_check(
        heads,
        kv_heads,
        dim,
        dropout=config.attention_dropout,
        device=device,
        dtype=dtype,
        window=window,
        kernel=kernel,
    )
    if not result["passed"]:
        raise RecipeError(
            f"attention_dropout: {config.attention_dropout} fails the dropout gradient check on {device} in {dtype} "
            f"(mask replay {result['mask_replay_ratio']:.2g} of its tolerance, expectation "
            f"{max(result['expectation_ratio'].values()):.2g} of at most {EXPECTATION_RATIO}, dropout applied: "
            f"{result['dropout_applied']}): this kernel's backward does not match its forward's dropout. Set "
            "attention_dropout: 0.0, or attn_implementation: sdpa_blocked."
        )
    return result
