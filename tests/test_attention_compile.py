"""A compiled Starcoder2 decoder layer with sdpa_varlen is one graph, equals eager, and does not recompile per batch.

`compile_layers` (training/trainer.py) compiles each decoder layer; these tests use the aot_eager backend
(dynamo and AOTAutograd, no code generation), which is what decides graphs, breaks and recompiles.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForCausalLM, Starcoder2Config

from starcoder2_train.data.collators import document_boundaries
from starcoder2_train.model.attention import SDPA_VARLEN
from starcoder2_train.model.presets import MODEL_PRESETS

# Batches of two rows of 100 tokens (the test preset's window is 32), with different documents and numbers of them.
DOCUMENTS = [[(40, 45, 15), (70, 30)], [(10, 90), (5, 5, 5, 85)], [(100,), (33, 33, 34)]]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Starcoder2Config(**{**MODEL_PRESETS["test"], "vocab_size": 96})
    return AutoModelForCausalLM.from_config(config, attn_implementation=SDPA_VARLEN).train()


def layer_inputs(model, documents, seed):
    """What Starcoder2Model passes a decoder layer for a packed batch from DocumentBoundaryCollator."""
    position_ids = torch.stack([torch.cat([torch.arange(length) for length in row]) for row in documents])
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*position_ids.shape, model.config.hidden_size, generator=generator, requires_grad=True)
    return dict(
        hidden_states=hidden,
        position_ids=position_ids,
        position_embeddings=model.model.rotary_emb(hidden, position_ids=position_ids),
        **document_boundaries(position_ids),
    )


def run(call, model, inputs):
    """Forward and backward of the first decoder layer through `call`: its output and gradients."""
    model.zero_grad()
    out = call(**inputs)
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.model.layers[0].named_parameters()}
    return out.detach(), inputs["hidden_states"].grad, grads


def test_compiled_layer_is_one_graph_and_equals_eager(model):
    layer = model.model.layers[0]
    eager = run(layer, model, layer_inputs(model, DOCUMENTS[0], 1))
    compiled = run(
        torch.compile(layer, fullgraph=True, backend="aot_eager"), model, layer_inputs(model, DOCUMENTS[0], 1)
    )
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    explanation = torch._dynamo.explain(layer)(**layer_inputs(model, DOCUMENTS[0], 1))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_new_document_boundaries_do_not_recompile(model):
    # Measured: the first batch compiles with static shapes; the second, whose cu_seq_lens has another length,
    # recompiles once with that length dynamic; no later batch recompiles, whatever its documents (the longest
    # document, max_length_q, changes too and is not read). Marking cu_seq_lens dynamic avoids even that one.
    counter = CompileCounterWithBackend("aot_eager")
    layer = torch.compile(model.model.layers[0], fullgraph=True, backend=counter)
    frames = []
    for seed, documents in enumerate([*DOCUMENTS, DOCUMENTS[0]]):
        run(layer, model, layer_inputs(model, documents, seed))
        frames.append(counter.frame_count)
    assert frames == [1, 2, 2, 2]

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    layer = torch.compile(model.model.layers[0], fullgraph=True, backend=counter)
    for seed, documents in enumerate(DOCUMENTS):
        inputs = layer_inputs(model, documents, seed)
        torch._dynamo.mark_dynamic(inputs["cu_seq_lens_q"], 0)
        run(layer, model, inputs)
    assert counter.frame_count == 1
