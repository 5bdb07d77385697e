"""A compiled Starcoder2 decoder layer with sdpa_varlen is one graph, equals eager, and compiles once for all batches.

`compile_layers` (training/trainer.py) compiles each decoder layer; these tests use the aot_eager backend
(dynamo and AOTAutograd, no code generation), which is what decides graphs, breaks and recompiles.
"""

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForCausalLM, Starcoder2Config

from starcoder2_train.data.batches.collators import document_boundaries, make_collator
from starcoder2_train.model.attention import SDPA_VARLEN, skip_mask_building
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
    model = AutoModelForCausalLM.from_config(config, attn_implementation=SDPA_VARLEN).train()
    model.config.use_cache = False  # as create_model does (a cache would be built and guarded on)
    return model


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


def test_without_the_decoder_hook_a_layer_compiles_twice(model):
    # Measured, calling the layer directly with the collator's keys (no `_mark_documents_dynamic`): the first batch
    # compiles with static shapes and max_length_q a constant; the second, whose cu_seq_lens has another length and
    # whose longest document differs, recompiles once with both dynamic; no later batch recompiles. The hook makes
    # that one compilation (test below).
    counter = CompileCounterWithBackend("aot_eager")
    layer = torch.compile(model.model.layers[0], fullgraph=True, backend=counter)
    frames = []
    for seed, documents in enumerate([*DOCUMENTS, DOCUMENTS[0]]):
        run(layer, model, layer_inputs(model, documents, seed))
        frames.append(counter.frame_count)
    assert frames == [1, 2, 2, 2]


class Recorder:
    """A dynamo backend that counts compilations and runs each graph through an fx Interpreter, recording the
    `max_length` argument each call of the varlen operator receives (a concrete int at run time)."""

    def __init__(self):
        self.frames, self.max_lengths, self.graphs = 0, [], []

    def __call__(self, graph_module, example_inputs):
        self.frames += 1
        self.graphs.append(graph_module)
        recorder = self

        class Spy(torch.fx.Interpreter):
            def call_function(self, target, args, kwargs):
                if target is torch.ops.starcoder2_train.varlen_attention.default:
                    recorder.max_lengths.append(args[4])
                return super().call_function(target, args, kwargs)

        return lambda *args: Spy(graph_module).run(*args)

    def varlen_calls(self):
        return [
            node
            for graph in self.graphs
            for node in graph.graph.nodes
            if node.target is torch.ops.starcoder2_train.varlen_attention.default
        ]


# One row of 100 tokens per batch, through the real collator: 1, 2 and 7 documents (cu_seq_lens of 2, 3, 8).
COLLATED_DOCUMENTS = [(100,), (60, 40), (10, 20, 5, 30, 15, 12, 8), (100,), (45, 55)]


def collated(documents, seed):
    positions = np.concatenate([np.arange(length) for length in documents])
    tokens = np.random.default_rng(seed).integers(0, 96, size=positions.shape)
    return make_collator(SDPA_VARLEN)([{"input_ids": tokens, "labels": tokens, "position_ids": positions}])


def test_compiled_layers_compile_once_and_receive_the_longest_document(model):
    # Through the model as the Trainer calls it: the collator's batch, the decoder's pre-hooks (skip_mask_building),
    # then each compiled layer. The first batch has one document (cu_seq_lens of length 2: dynamo's 0/1
    # specialisation must not make it a constant), the next ones 2 and 7.
    skip_mask_building(model)
    recorder = Recorder()
    for layer in model.model.layers:
        layer.compile(backend=recorder, fullgraph=True)
    try:
        for seed, documents in enumerate(COLLATED_DOCUMENTS):
            model(**collated(documents, seed)).loss.backward()
    finally:
        for layer in model.model.layers:
            layer._compiled_call_impl = None
    assert recorder.frames == 1  # both layers share the one graph, and no batch recompiles it
    assert recorder.max_lengths == [max(documents) for documents in COLLATED_DOCUMENTS for _ in model.model.layers]
    # The longest document is an input of the graph (a symbolic int), not a constant of it.
    assert all(isinstance(node.args[4], torch.fx.Node) for node in recorder.varlen_calls())
