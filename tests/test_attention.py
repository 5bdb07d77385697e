import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Starcoder2Config

from starcoder2_train.data.collators import DocumentBoundaryCollator, PackedCollator, document_boundaries, document_ids
from starcoder2_train.model.attention import (
    SDPA_BLOCKED,
    SDPA_VARLEN,
    blocked_sdpa_attention_forward,
    varlen_attention_forward,
)
from starcoder2_train.model.presets import MODEL_PRESETS

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
