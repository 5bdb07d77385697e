import copy
import re
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import current_flash_attention_impl
from transformers import AttentionInterface, AutoModelForCausalLM, Starcoder2Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from starcoder2_train.configs import ModelArguments, RecipeError
from starcoder2_train.data.batches.collators import (
    DocumentBoundaryCollator,
    PackedCollator,
    document_boundaries,
    document_ids,
)
from starcoder2_train.model import factory
from starcoder2_train.model.attention import (
    SDPA_BLOCKED,
    SDPA_VARLEN,
    _flash_backward,
    _flash_forward,
    blocked_sdpa_attention_forward,
    varlen_attention,
    varlen_attention_backward,
    varlen_attention_forward,
    varlen_reference,
)
from starcoder2_train.model.factory import create_model, verify_attention
from starcoder2_train.model.flash import (
    FLASH_PACKAGES,
    activate_flash_impl,
    choose_flash_impl,
    installed_flash_packages,
)
from starcoder2_train.model.presets import MODEL_PRESETS, build_config

VOCAB = 96
# Two rows of 100 tokens: documents of 40, 45 and 15 tokens, then 70 and 30 (the test preset's window is 32).
POSITIONS = torch.stack(
    [
        torch.cat([torch.arange(40), torch.arange(45), torch.arange(15)]),
        torch.cat([torch.arange(70), torch.arange(30)]),
    ]
)


def model_with(attention: str):
    torch.manual_seed(0)
    config = Starcoder2Config(**{**MODEL_PRESETS["test"], "vocab_size": VOCAB})
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attention)
    model.config.use_cache = False
    return model


def test_document_boundaries_of_a_flattened_batch():
    assert document_ids(POSITIONS)[0, [0, 39, 40, 84, 85, 99]].tolist() == [1, 1, 2, 2, 3, 3]
    boundaries = document_boundaries(POSITIONS)
    assert boundaries["cu_seq_lens_q"].tolist() == [0, 40, 85, 100, 170, 200]
    assert boundaries["cu_seq_lens_q"].dtype == torch.int32 and boundaries["max_length_q"] == 70
    zeros = torch.zeros(100, dtype=torch.long).numpy()
    features = [{"input_ids": zeros, "labels": zeros, "position_ids": row.numpy()} for row in POSITIONS]
    batch = DocumentBoundaryCollator(PackedCollator())(features)
    assert batch["cu_seq_lens_k"].tolist() == [0, 40, 85, 100, 170, 200] and batch["max_length_k"] == 70


@pytest.mark.parametrize("attention", [SDPA_VARLEN, SDPA_BLOCKED])
def test_packed_documents_stay_apart_as_with_transformers_sdpa(attention):
    input_ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ("sdpa", attention):
        model = model_with(name)
        extra = document_boundaries(POSITIONS) if name == SDPA_VARLEN else {}
        output = model(input_ids=input_ids, position_ids=POSITIONS, labels=input_ids, **extra)
        output.loss.backward()
        results[name] = output.logits, {n: p.grad for n, p in model.named_parameters()}
    (logits, grads), (our_logits, our_grads) = results["sdpa"], results[attention]
    torch.testing.assert_close(our_logits, logits, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(our_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Without position_ids the documents would see each other: the comparison above is not vacuous.
    assert (model_with("sdpa")(input_ids=input_ids).logits - logits).abs().max() > 1e-2


@pytest.mark.parametrize("block_size", [1, 7, 32, 100, 512])
@pytest.mark.parametrize("window", [None, 5, 32, 200])
def test_blocked_sdpa_equals_one_masked_sdpa(block_size, window):
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(2, 4, 100, 8, generator=generator)
    key, value = (torch.randn(2, 2, 100, 8, generator=generator) for _ in range(2))
    expected, _ = varlen_attention_forward(
        None, query, key, value, None, sliding_window=window, position_ids=POSITIONS
    )
    actual, _ = blocked_sdpa_attention_forward(
        None, query, key, value, None, sliding_window=window, position_ids=POSITIONS, block_size=block_size
    )
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", [SDPA_VARLEN, SDPA_BLOCKED])
def test_padded_batches_and_generation_fall_back_to_sdpa(attention):
    input_ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding, as batched generation has
    outputs = {}
    for name in ("sdpa", attention):
        model = model_with(name).eval()
        model.config.use_cache = True
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False, pad_token_id=0
            )
        outputs[name] = logits, generated
    torch.testing.assert_close(outputs[attention][0], outputs["sdpa"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[attention][1], outputs["sdpa"][1])


def packed_qkv(heads=4, kv_heads=2, dim=8, seed=4):
    """(tokens, heads, dim) query and (tokens, kv_heads, dim) key and value of POSITIONS' 200 tokens, and a grad."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(200, heads, dim, generator=generator, requires_grad=True)
    key, value = (torch.randn(200, kv_heads, dim, generator=generator, requires_grad=True) for _ in range(2))
    return query, key, value, torch.randn(200, heads, dim, generator=generator)


CU_SEQ_LENS = document_boundaries(POSITIONS)["cu_seq_lens_q"]  # five documents: 40, 45, 15 | 70, 30


@pytest.mark.parametrize("window_left", [-1, 4, 31])
def test_varlen_op_forward_and_backward_equal_the_reference(window_left):
    query, key, value, grad = packed_qkv()
    out = varlen_attention(query, key, value, CU_SEQ_LENS, 100, 0.0, 0.3, window_left)[0]
    grads = torch.autograd.grad(out, (query, key, value), grad)
    expected = varlen_reference(query, key, value, CU_SEQ_LENS, 0.0, 0.3, window_left)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert [g.shape[1] for g in grads] == [4, 2, 2]  # grouped-query attention: k and v keep their head count
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # The schema, the fake (meta) implementation and the autograd registration agree with the real kernel.
    torch.library.opcheck(varlen_attention, (query, key, value, CU_SEQ_LENS, 100, 0.0, 0.3, window_left))


def test_the_cuda_path_calls_aten_flash_as_its_schemas_and_the_fakes_say():
    # Under FakeTensorMode, CUDA tensors need no GPU: aten's flash ops run their meta functions, which check the
    # arguments of the calls the CUDA path makes and give the shapes our fake implementations must match.
    with FakeTensorMode():
        query = torch.empty(200, 4, 8, device="cuda", dtype=torch.bfloat16)
        key, value = (torch.empty(200, 2, 8, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cu_seq_lens = torch.empty(6, device="cuda", dtype=torch.int32)
        args = (cu_seq_lens, 100, 0.1, 0.3, 31)
        kernel = _flash_forward(query, key, value, *args)
        fake = varlen_attention(query, key, value, *args)
        assert [(t.shape, t.dtype) for t in kernel] == [(t.shape, t.dtype) for t in fake]
        grad_kernel = _flash_backward(torch.empty_like(query), query, key, value, *kernel, *args)
        grad_fake = varlen_attention_backward(torch.empty_like(query), query, key, value, *kernel, *args)
        assert [(t.shape, t.dtype) for t in grad_kernel] == [(t.shape, t.dtype) for t in grad_fake]
        assert [t.shape[1] for t in grad_fake] == [4, 2, 2]


def test_dropout_on_a_cpu_runs_the_eager_reference():
    query, key, value, _ = packed_qkv()
    with pytest.raises(ValueError, match="dropout needs the CUDA kernel"):
        varlen_attention(query, key, value, CU_SEQ_LENS, 100, 0.1, None, -1)
    batched = [t.detach().view(2, 100, -1, 8).transpose(1, 2).requires_grad_() for t in (query, key, value)]
    kept = varlen_attention_forward(None, *batched, None, position_ids=POSITIONS)[0]
    dropped = varlen_attention_forward(None, *batched, None, dropout=0.5, position_ids=POSITIONS)[0]
    dropped.sum().backward()
    assert not torch.allclose(dropped, kept) and all(torch.isfinite(t.grad).all() for t in batched)


H100, B200, A100, RTX_5090 = (9, 0), (10, 0), (8, 0), (12, 0)
BOTH = {"flash_attn_interface", "flash_attn.cute.interface"}


@pytest.mark.parametrize(
    "requested, dropout, capability, packages, expected",
    [
        ("auto", 0.0, None, BOTH, "fa2"),  # no GPU: nothing to route
        ("auto", 0.0, H100, BOTH, "fa4"),
        ("auto", 0.0, H100, {"flash_attn_interface"}, "fa3"),
        ("auto", 0.0, B200, {"flash_attn_interface"}, "fa2"),  # FA3 is Hopper only
        ("auto", 0.0, B200, BOTH, "fa4"),
        ("auto", 0.0, A100, BOTH, "fa2"),
        ("auto", 0.0, RTX_5090, BOTH, "fa2"),  # torch's FA4 glue takes 9.x and 10.x only
        ("auto", 0.1, H100, BOTH, "fa2"),  # dropout: neither FA3 nor FA4 has it
        ("fa2", 0.1, H100, BOTH, "fa2"),
        ("fa3", 0.0, H100, {"flash_attn_interface"}, "fa3"),
        ("fa4", 0.0, B200, {"flash_attn.cute.interface"}, "fa4"),
        ("fa3", 0.0, None, set(), "fa2"),
    ],
)
def test_flash_impl_decision(requested, dropout, capability, packages, expected):
    impl, reason = choose_flash_impl(requested, dropout, capability, packages)
    assert impl == expected and reason


@pytest.mark.parametrize(
    "requested, dropout, capability, packages, message",
    [
        ("fa3", 0.1, H100, BOTH, "flash_attention_impl: fa3 has no dropout, and the model's attention_dropout is 0.1"),
        ("fa4", 0.1, None, set(), "flash_attention_impl: fa4 has no dropout"),  # a wrong recipe on any machine
        ("fa3", 0.0, A100, BOTH, "flash_attention_impl: fa3 needs compute capability 9.x, this GPU has 8.0"),
        ("fa4", 0.0, RTX_5090, BOTH, "flash_attention_impl: fa4 needs compute capability 9.x or 10.x"),
        ("fa4", 0.0, H100, {"flash_attn_interface"}, "flash_attention_impl: fa4 needs the flash_attn.cute.interface"),
    ],
)
def test_flash_impl_errors_name_the_keys(requested, dropout, capability, packages, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        choose_flash_impl(requested, dropout, capability, packages)


def test_auto_says_why_it_keeps_fa2():
    _, reason = choose_flash_impl("auto", 0.0, H100, set())
    assert "flash_attn.cute" in reason and "flash_attn_interface" in reason
    assert "dropout" in choose_flash_impl("auto", 0.1, H100, BOTH)[1]


def test_activate_flash_impl_on_this_machine():
    assert installed_flash_packages() <= set(FLASH_PACKAGES.values())
    with pytest.raises(RecipeError, match="attention_dropout"):
        activate_flash_impl("fa4", 0.1)
    if not torch.cuda.is_available():
        assert activate_flash_impl("fa3", 0.0) == "fa2" and current_flash_attention_impl() is None


def ignores_documents(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A wrong kernel: causal over the whole row, as if the row were one document."""
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)


def doubles_gradients(module, query, key, value, attention_mask, **kwargs):
    """A wrong kernel whose forward is right: the output of sdpa_blocked, with twice its gradients."""
    out, _ = blocked_sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return 2 * out - out.detach(), None


def fails(module, query, *args, **kwargs):
    raise NotImplementedError("no kernel for this device")


for name, function in (
    ("test_ignores_documents", ignores_documents),
    ("test_doubles_gradients", doubles_gradients),
    ("test_fails", fails),
):
    AttentionInterface.register(name, function)
TINY = Starcoder2Config(**{**MODEL_PRESETS["tiny"], "vocab_size": VOCAB})


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("attention", [SDPA_VARLEN, SDPA_BLOCKED])
def test_verify_attention_passes_the_kernels_of_this_project(attention, dtype, tolerance):
    start = time.perf_counter()
    errors = verify_attention(attention, TINY, "cpu", dtype)
    assert time.perf_counter() - start < 1.0
    assert set(errors) == {"output", "grad_query", "grad_key", "grad_value"}
    assert all(error <= tolerance for error in errors.values())
    no_window = copy.deepcopy(TINY)
    no_window.sliding_window = None
    assert max(verify_attention(attention, no_window, "cpu", dtype).values()) <= tolerance


@pytest.mark.parametrize(
    "attention, message",
    [
        ("test_ignores_documents", r"test_ignores_documents differs .* \(relative errors output \d"),
        ("test_doubles_gradients", r"test_doubles_gradients differs .* output \d\.\de-0[5-9], grad_query 1\.0e\+00"),
        ("test_fails", r"test_fails fails forward and backward on cpu .*no kernel for this device"),
    ],
)
def test_verify_attention_refuses_a_wrong_kernel(attention, message):
    with pytest.raises(RecipeError, match=f"attn_implementation: {message}"):
        verify_attention(attention, TINY, "cpu", torch.float32)


def test_create_model_verifies_the_attention(monkeypatch):
    args = ModelArguments(model_config="test", torch_dtype="float32")
    config = build_config(args, VOCAB)
    assert create_model(args, config, None, SDPA_VARLEN).config._attn_implementation == SDPA_VARLEN
    monkeypatch.setattr(factory, "VERIFIED_ATTENTION", (*factory.VERIFIED_ATTENTION, "test_ignores_documents"))
    with pytest.raises(RecipeError, match="attn_implementation: test_ignores_documents differs"):
        create_model(args, copy.deepcopy(config), None, "test_ignores_documents")
    create_model(args, copy.deepcopy(config), None, "test_ignores_documents", verify=False)
    create_model(args, copy.deepcopy(config), None, "test_ignores_documents", device="meta")  # nothing to run


def test_the_kernel_gets_the_longest_document_not_the_row_width(monkeypatch):
    """The flash kernel's grid is ceil(max_length/128) x documents x heads: max_length must be the longest document
    of the batch (70 of POSITIONS' rows of 100), from the collator; the row width only without document boundaries."""
    from starcoder2_train.model import attention

    seen = []

    def spy(query, key, value, cu_seq_lens, max_length, *args):
        seen.append(max_length)
        return varlen_attention(query, key, value, cu_seq_lens, max_length, *args)

    monkeypatch.setattr(attention, "varlen_attention", spy)
    model = model_with(SDPA_VARLEN)
    attention.skip_mask_building(model)
    input_ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(5))
    features = [
        {"input_ids": ids.numpy(), "labels": ids.numpy(), "position_ids": p.numpy()}
        for ids, p in zip(input_ids, POSITIONS)
    ]
    model(**DocumentBoundaryCollator(PackedCollator())(features)).loss.backward()
    assert seen == [70, 70]  # one call per layer
    seen.clear()
    model(input_ids=input_ids, position_ids=POSITIONS)  # no collator: the row width
    assert seen == [100, 100]


def test_a_max_length_shorter_than_a_document_is_refused():
    query, key, value, _ = packed_qkv()
    with pytest.raises(ValueError, match="max_length 69 is shorter than a document"):
        varlen_attention(query, key, value, CU_SEQ_LENS, 69, 0.0, None, -1)
