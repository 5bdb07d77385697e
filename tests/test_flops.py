import pytest
import torch
from transformers import AutoModelForCausalLM, Starcoder2Config

from starcoder2_train.model.flops import model_flops_per_token, peak_flops_for_device
from starcoder2_train.model.presets import MODEL_PRESETS


def hand_config(**overrides):
    values = dict(
        num_hidden_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=10,
        sliding_window=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return Starcoder2Config(**{**values, **overrides})


def test_tiny_config_by_hand():
    # head_dim 4; per layer q 8·8 + k,v 2·8·4 + o 8·8 + c_fc/c_proj 2·8·32 = 704; 2 layers + lm_head 10·8 = 1488.
    six_n = 6 * 1488
    # s = 8, w = 4: keys per query 1,2,3,4,4,4,4,4 -> 26/8 = 3.25; attention 12·L·h·k = 12·2·8·3.25 = 624.
    assert model_flops_per_token(hand_config(), 8) == six_n + 624
    # No window: k = (8+1)/2 = 4.5 -> 864. PaLM convention: k = s = 8 -> 1536.
    assert model_flops_per_token(hand_config(sliding_window=None), 8) == six_n + 864
    assert model_flops_per_token(hand_config(), 8, convention="palm") == six_n + 1536
    # A window at least as long as the sequence changes nothing.
    assert model_flops_per_token(hand_config(sliding_window=8), 8) == six_n + 864
    # Untied embeddings: the input embedding is a lookup, so FLOPs do not change.
    assert model_flops_per_token(hand_config(tie_word_embeddings=False), 8) == six_n + 624
    with pytest.raises(ValueError, match="convention"):
        model_flops_per_token(hand_config(), 8, convention="full")


def test_matmul_parameters_equal_the_models_linear_weights():
    config = hand_config(num_key_value_heads=1, vocab_size=64)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * 2 * 8 * 3.25
    assert model_flops_per_token(config, 8) == 6 * linear + attention


def test_starcoder2_3b_matches_reference():
    config = Starcoder2Config(**MODEL_PRESETS["starcoder2-3b"])
    matmul_params = 30 * (2 * 3072 * 3072 + 2 * 3072 * 256 + 2 * 3072 * 12288) + 49152 * 3072
    assert matmul_params == 3_029_336_064
    assert 6 * matmul_params / 1e9 == pytest.approx(18.18, abs=0.005)
    at_4k = model_flops_per_token(config, 4096)
    at_16k = model_flops_per_token(config, 16384)
    assert at_4k == 6 * matmul_params + 12 * 30 * 3072 * 2048.5
    assert at_16k == 6 * matmul_params + 12 * 30 * 3072 * 3584.125  # (4096·4097/2 + 12288·4096) / 16384
    assert (at_4k - 6 * matmul_params) / 1e9 == pytest.approx(2.26, abs=0.01)
    assert (at_16k - 6 * matmul_params) / 1e9 == pytest.approx(3.96, abs=0.005)
    assert at_4k / 1e9 == pytest.approx(20.4, abs=0.05)
    # REFERENCE's 22.15 uses all 3.03B parameters for 6N; biases and norms (1.04M) add 0.006 GFLOP.
    assert at_16k / 1e9 == pytest.approx(22.15, abs=0.015)
    assert model_flops_per_token(config, 4096, "palm") == 6 * matmul_params + 12 * 30 * 3072 * 4096


def test_peak_flops_by_device_name():
    assert peak_flops_for_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_device("NVIDIA H200") == 989e12
    assert peak_flops_for_device("cpu") is None and peak_flops_for_device(None) is None
    assert peak_flops_for_device("NVIDIA GeForce RTX 3090") is None
