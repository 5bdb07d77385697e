"""float8 (training/float8.py): the refusals, and which layers are converted. No fp8 matmul runs on the CPU."""

import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Starcoder2Config

from starcoder2_train.configs import PretrainingArguments, RecipeError
from starcoder2_train.model.presets import MODEL_PRESETS
from starcoder2_train.training.float8 import (
    check_float8_device,
    enable_float8,
    float8_module_filter,
    high_precision_module_names,
)

# hidden 64 (head_dim 16, 2 KV heads: k/v out 32) converts; intermediate 200 is no multiple of 16 and does not.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONVERTED = [f"model.layers.{layer}.self_attn.{name}" for layer in range(2) for name in ATTENTION]


def tiny_model(tied: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = Starcoder2Config(
        **{**MODEL_PRESETS["test"], "vocab_size": 96, "intermediate_size": 200, "tie_word_embeddings": tied}
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "device_type, capability, match",
    [
        ("cpu", None, "float8: needs a CUDA GPU with fp8 tensor cores .*not 'cpu'; set float8: false"),
        ("mps", None, "float8: needs a CUDA GPU"),
        ("cuda", (8, 0), r"float8: this GPU has compute capability 8\.0; fp8 matmuls need 8\.9\+ .*not A100"),
        ("cuda", (7, 5), r"compute capability 7\.5"),
        ("cuda", None, "compute capability unknown"),
    ],
)
def test_enable_float8_refuses_devices_without_fp8_tensor_cores(device_type, capability, match):
    model = tiny_model()
    with pytest.raises(RecipeError, match=match):
        enable_float8(model, device_type, capability)
    assert not any(type(module).__name__ == "Float8Linear" for module in model.modules())


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_capable_gpus_pass_the_device_check(capability):
    check_float8_device("cuda", capability)


def test_enable_float8_without_torchao_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # the import fails as if torchao were missing
    with pytest.raises(RecipeError, match=r"float8: needs torchao \(`pip install torchao`"):
        enable_float8(tiny_model(), "cuda", (9, 0))


def test_the_filter_keeps_lm_head_and_odd_sizes_in_bf16():
    assert float8_module_filter(nn.Linear(64, 32), "model.layers.0.self_attn.k_proj")
    assert not float8_module_filter(nn.Linear(64, 200), "model.layers.0.mlp.c_fc")  # out 200
    assert not float8_module_filter(nn.Linear(200, 64), "model.layers.0.mlp.c_proj")  # in 200
    assert not float8_module_filter(nn.Linear(64, 96), "lm_head")
    assert not float8_module_filter(nn.Linear(64, 96), "head", high_precision=frozenset({"head"}))
    assert not float8_module_filter(nn.Embedding(96, 64), "model.embed_tokens")
    assert not float8_module_filter(nn.LayerNorm(64), "model.norm")


@pytest.mark.parametrize("tied", [True, False])
def test_the_filter_decisions_on_a_tiny_starcoder2(tied):
    model = tiny_model(tied)
    high_precision = high_precision_module_names(model)
    assert high_precision == {"lm_head", "model.embed_tokens"}
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    chosen = [name for name, module in model.named_modules() if float8_module_filter(module, name, high_precision)]
    assert chosen == CONVERTED


@pytest.mark.parametrize("tied", [True, False])
def test_torchao_converts_exactly_the_chosen_layers_and_shares_the_weights(tied):
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    model = tiny_model(tied)
    weights = {name: parameter for name, parameter in model.named_parameters()}
    keys = list(model.state_dict())
    assert enable_float8(model, "cuda", (9, 0)) == CONVERTED  # conversion only: no fp8 math runs here
    assert [name for name, module in model.named_modules() if isinstance(module, Float8Linear)] == CONVERTED
    assert type(model.lm_head) is nn.Linear and type(model.model.layers[0].mlp.c_fc) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj.config.cast_config_weight.scaling_granularity.value == "tensorwise"
    assert all(parameter is weights[name] for name, parameter in model.named_parameters())  # no copies
    assert list(model.state_dict()) == keys  # checkpoints keep their keys


def test_recipe_key_defaults_to_off():
    assert PretrainingArguments(output_dir="unused", report_to="none").float8 is False
