"""model/dropout_check.py on the CPU: a kernel whose backward keeps its forward's dropout mask passes; one that
draws another mask, one that applies no dropout and one that scales its gradients wrongly fail."""

import pytest
import torch
from transformers import Starcoder2Config

from starcoder2_train.configs import RecipeError
from starcoder2_train.model.attention import varlen_reference
from starcoder2_train.model.dropout_check import EXPECTATION_RATIO, dropout_gradient_check, require_dropout_replay
from starcoder2_train.model.presets import MODEL_PRESETS

SHAPE = (4, 2, 8)  # query heads, key/value heads, head dim
CHECK = dict(dropout=0.3, device="cpu", dtype=torch.float32, documents=(1, 7, 20, 33), draws=64)


def reference_kernel(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
    """sdpa per document: autograd records sdpa's dropout mask, so the backward uses the forward's."""
    return varlen_reference(query, key, value, cu_seq_lens, dropout, scale, window_left)


class _Redraws(torch.autograd.Function):
    """The reference's forward; a backward that runs it again, with a fresh dropout mask."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seq_lens, dropout, scale, window_left):
        ctx.save_for_backward(query, key, value, cu_seq_lens)
        ctx.options = (dropout, scale, window_left)
        return varlen_reference(query, key, value, cu_seq_lens, dropout, scale, window_left)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, cu_seq_lens = ctx.saved_tensors
        inputs = [t.detach().requires_grad_() for t in (query, key, value)]
        with torch.enable_grad():
            out = varlen_reference(*inputs, cu_seq_lens, *ctx.options)
        return *torch.autograd.grad(out, inputs, grad_out), None, None, None, None


def redraws_its_mask(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
    return _Redraws.apply(query, key, value, cu_seq_lens, dropout, scale, window_left)


def no_dropout(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
    return varlen_reference(query, key, value, cu_seq_lens, 0.0, scale, window_left)


def unscaled_gradients(query, key, value, cu_seq_lens, max_length, dropout, scale, window_left):
    """Right forward, gradients (1 - p) times too small (as if the backward forgot the 1/(1-p) of dropout)."""
    out = varlen_reference(query, key, value, cu_seq_lens, dropout, scale, window_left)
    return (1 - dropout) * out + dropout * out.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_a_kernel_that_keeps_its_mask_passes(window, dtype):
    torch.manual_seed(0)
    result = dropout_gradient_check(*SHAPE, **{**CHECK, "dtype": dtype}, window=window, kernel=reference_kernel)
    assert result["passed"], result
    assert result["mask_replay_ratio"] <= 1.0 and result["dropout_applied"]
    assert all(ratio <= EXPECTATION_RATIO for ratio in result["expectation_ratio"].values())


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 1e3), (torch.bfloat16, 5)])
def test_a_backward_with_another_mask_fails_the_replay_check(dtype, ratio):
    torch.manual_seed(0)
    result = dropout_gradient_check(*SHAPE, **{**CHECK, "dtype": dtype}, kernel=redraws_its_mask)
    assert not result["passed"] and result["mask_replay_ratio"] > ratio  # 25-34 in bf16 (seeds 0-2)
    # Its gradients still have the right expectation: only the replay check can see this bug.
    assert all(ratio <= EXPECTATION_RATIO for ratio in result["expectation_ratio"].values())


def test_no_dropout_and_wrongly_scaled_gradients_fail():
    result = dropout_gradient_check(*SHAPE, **CHECK, kernel=no_dropout)
    assert not result["passed"] and not result["dropout_applied"]
    torch.manual_seed(0)
    result = dropout_gradient_check(*SHAPE, **CHECK, kernel=unscaled_gradients)
    assert not result["passed"] and result["mask_replay_ratio"] > 1e3
    assert min(result["expectation_ratio"].values()) > EXPECTATION_RATIO


def test_verify_attention_s_dropout_step_names_attention_dropout():
    config = Starcoder2Config(**{**MODEL_PRESETS["test"], "vocab_size": 96, "attention_dropout": 0.1})
    torch.manual_seed(0)
    assert require_dropout_replay(config, "cpu", torch.float32, window=16, kernel=reference_kernel)["passed"]
    with pytest.raises(RecipeError, match=r"attention_dropout: 0.1 fails the dropout gradient check on cpu"):
        require_dropout_replay(config, "cpu", torch.float32, window=16, kernel=redraws_its_mask)
