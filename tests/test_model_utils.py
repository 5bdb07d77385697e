import json
import random

import pytest
import torch
from transformers import Starcoder2Config

from starcoder2_train.configs import ModelArguments, RecipeError
from starcoder2_train.data.tokens.tokenizer import train_tokenizer
from starcoder2_train.model.factory import choose_attention, count_parameters, create_model, validate_model_and_data
from starcoder2_train.model.presets import MODEL_PRESETS, build_config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 7))) for _ in range(400)]
    texts = [" ".join(rng.choices(words, k=200)) + "\n" for _ in range(50)]
    return train_tokenizer(iter(texts), vocab_size=700, output_dir=tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize(
    "name, expected",
    [("starcoder2-3b", 3_030_371_328), ("starcoder2-7b", 7_173_923_840), ("starcoder2-15b", 15_957_889_024)],
)
def test_released_presets_have_the_released_parameter_counts(name, expected):
    config = build_config(ModelArguments(model_config=name), tokenizer_vocab_size=700)
    assert config.vocab_size == 49152  # a smaller tokenizer leaves the released vocabulary alone
    assert count_parameters(config) == expected


def test_released_presets_avoid_the_config_defaults():
    for name in ("starcoder2-3b", "starcoder2-7b", "starcoder2-15b"):
        config = Starcoder2Config(**MODEL_PRESETS[name])
        assert (config.bos_token_id, config.eos_token_id, config.sliding_window) == (0, 0, 4096)
        assert (config.max_position_embeddings, config.vocab_size, config.norm_epsilon) == (16384, 49152, 1e-5)
        assert config.hidden_act == "gelu_pytorch_tanh" and config.use_bias
    assert Starcoder2Config(**MODEL_PRESETS["starcoder2-3b"]).rope_parameters["rope_theta"] == 999999.4420358813
    assert Starcoder2Config(**MODEL_PRESETS["starcoder2-15b"]).tie_word_embeddings is False


def test_small_presets_take_the_tokenizer_vocabulary_and_overrides(tmp_path):
    args = ModelArguments(model_config="tiny", rope_theta=5e5, max_position_embeddings=2048, sliding_window=256)
    config = build_config(args, tokenizer_vocab_size=8193)
    assert config.vocab_size == 8256  # rounded up to a multiple of 64
    assert config.rope_parameters["rope_theta"] == 5e5
    assert (config.max_position_embeddings, config.sliding_window) == (2048, 256)
    tiny = build_config(ModelArguments(model_config="tiny"), 8192)
    assert 4e6 <= count_parameters(tiny) <= 10e6
    assert (tiny.num_attention_heads, tiny.num_key_value_heads, tiny.sliding_window) == (8, 2, 512)
    test = build_config(ModelArguments(model_config="test"), 700)
    assert 100e3 <= count_parameters(test) <= 500e3
    # A larger tokenizer does not fit a released preset: refused, naming the key.
    with pytest.raises(RecipeError, match="tokenizer_name_or_path: the tokenizer has 50000 tokens"):
        build_config(ModelArguments(model_config="starcoder2-3b"), 50_000)
    # A config.json path works like a preset.
    path = tmp_path / "config.json"
    test.to_json_file(path)
    from_file = build_config(ModelArguments(model_config=str(path), sliding_window=16), 700)
    assert (from_file.hidden_size, from_file.sliding_window, from_file.vocab_size) == (64, 16, 704)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match="model_config: 'starcoder2-4b' is neither a preset"):
        build_config(ModelArguments(model_config="starcoder2-4b"), 700)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RecipeError, match="model_config: .* model_type 'llama'"):
        build_config(ModelArguments(model_config=str(path)), 700)


def test_choose_attention():
    from starcoder2_train.model.flash import flash_attention_2_available

    has_flash = flash_attention_2_available(torch.cuda.is_available())
    expected = ("flash_attention_2" if has_flash else "sdpa_varlen") if torch.cuda.is_available() else "sdpa_blocked"
    assert choose_attention("auto") == expected
    assert choose_attention("eager") == "eager"
    if not has_flash:
        with pytest.raises(RecipeError, match="attn_implementation"):
            choose_attention("flash_attention_2")


def test_create_from_scratch_trains_one_step(tokenizer):
    args = ModelArguments(model_config="test", torch_dtype="float32")
    model = create_model(args, tokenizer=tokenizer)
    assert model.config.use_cache is False and model.config._attn_implementation == choose_attention("auto")
    assert model.get_input_embeddings().weight.shape[0] == 704 and model.dtype == torch.float32
    ids = torch.tensor([tokenizer("abc def ghij abc")["input_ids"] * 4])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None
    assert (
        create_model(ModelArguments(model_config="test", torch_dtype="bfloat16"), tokenizer=tokenizer).dtype
        == torch.bfloat16
    )


def test_load_pretrained_resizes_and_applies_overrides(tmp_path, tokenizer):
    small = build_config(ModelArguments(model_config="test"), 600)  # a checkpoint with 640 rows
    checkpoint = create_model(ModelArguments(model_config="test", torch_dtype="float32"), small)
    checkpoint.save_pretrained(tmp_path / "ckpt")
    args = ModelArguments(model_name_or_path=str(tmp_path / "ckpt"), torch_dtype="auto", rope_theta=1e6)
    config = build_config(args, len(tokenizer))
    assert config.vocab_size == 640 and config.rope_parameters["rope_theta"] == 1e6
    validate_model_and_data(config, tokenizer, seq_length=128, from_scratch=False)  # ids 0..6 inside 640
    model = create_model(args, config, tokenizer, "eager")
    assert model.config._attn_implementation == "eager"
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == 704 and model.config.vocab_size == 704  # 700 tokens, padded to 64
    assert model.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()  # still tied
    assert torch.equal(embeddings[:640], checkpoint.get_input_embeddings().weight)  # trained rows kept
    assert model.config.rope_parameters["rope_theta"] == 1e6 and model.config.use_cache is False
    assert model.dtype == torch.float32
    meta = create_model(args, build_config(args, len(tokenizer)), tokenizer, device="meta")
    assert meta.get_input_embeddings().weight.is_meta


def test_validate_model_and_data(tokenizer):
    config = build_config(ModelArguments(model_config="test"), len(tokenizer))
    assert validate_model_and_data(config, tokenizer, seq_length=1024).fim_middle == 2
    with pytest.raises(RecipeError, match="seq_length: 2048 exceeds .* max_position_embeddings"):
        validate_model_and_data(config, tokenizer, seq_length=2048)
    # A checkpoint whose vocabulary ends before the structure tokens: not this tokenizer's model.
    config.vocab_size = 5
    with pytest.raises(RecipeError, match=r"tokenizer_name_or_path: .*\[5, 6\]"):
        validate_model_and_data(config, tokenizer, seq_length=128, from_scratch=False)
    validate_model_and_data(config, tokenizer, seq_length=128)  # from scratch the vocabulary is sized to fit
