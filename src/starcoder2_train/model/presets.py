"""Model presets equal to the released StarCoder2 configs, and the config a recipe trains.

Vocabulary rule. The embedding matrix must hold every id the tokenizer can produce:
- from scratch, the tiny/quickstart/test presets take the tokenizer's length rounded up to a multiple of 64;
  the released presets and config.json files keep their vocab_size (49152 for StarCoder2), and a
  tokenizer larger than that is refused (`tokenizer_name_or_path`) rather than silently changing the
  released architecture;
- from a checkpoint, factory.create_model resizes the embeddings (again to a multiple of 64) when the
  tokenizer is larger; factory.validate_model_and_data refuses a tokenizer whose structure tokens lie
  beyond the checkpoint's vocabulary, since their embeddings would be untrained new rows.
"""

import copy
import os

from transformers import AutoConfig, Starcoder2Config

from starcoder2_train.configs import ModelArguments, RecipeError, hub_hint

VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of 64 for tensor-core friendly shapes

_RELEASED = dict(
    vocab_size=49152,
    max_position_embeddings=16384,
    sliding_window=4096,
    hidden_act="gelu_pytorch_tanh",
    norm_epsilon=1e-5,
    use_bias=True,
    bos_token_id=0,
    eos_token_id=0,
)


# Dropout as written in the released config.json files (UNVERIFIED against the Hub, which is out of reach
# here: public copies show 0.1 for the Megatron-trained 3B/7B and 0.0 for the nanotron-trained 15B).
_DROPOUT_3B_7B = dict(attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1)
_DROPOUT_15B = dict(attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0)

_SMALL = dict(
    hidden_act="gelu_pytorch_tanh",
    norm_epsilon=1e-5,
    use_bias=True,
    bos_token_id=0,
    eos_token_id=0,
    tie_word_embeddings=True,
    initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    attention_dropout=0.0,
    residual_dropout=0.0,
    embedding_dropout=0.0,
)


# Starcoder2Config keyword arguments. tiny, quickstart and test have no vocab_size: build_config sets it from the
# tokenizer.
MODEL_PRESETS = {
    "starcoder2-3b": dict(
        **_RELEASED,
        **_DROPOUT_3B_7B,
        num_hidden_layers=30,
        hidden_size=3072,
        num_attention_heads=24,
        num_key_value_heads=2,
        intermediate_size=12288,
        tie_word_embeddings=True,
        initializer_range=0.018042,
        rope_parameters={"rope_type": "default", "rope_theta": 999999.4420358813},
    ),
    "starcoder2-7b": dict(
        **_RELEASED,
        **_DROPOUT_3B_7B,
        num_hidden_layers=32,
        hidden_size=4608,
        num_attention_heads=36,
        num_key_value_heads=4,
        intermediate_size=18432,
        tie_word_embeddings=True,
        initializer_range=0.018042,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "starcoder2-15b": dict(
        **_RELEASED,
        **_DROPOUT_15B,
        num_hidden_layers=40,
        hidden_size=6144,
        num_attention_heads=48,
        num_key_value_heads=4,
        intermediate_size=24576,
        tie_word_embeddings=False,
        initializer_range=0.01275,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    # CPU rehearsals and benchmarks: 3.8M parameters with a 4,096-token tokenizer (4.9M with 8,192).
    "tiny": dict(
        **_SMALL,
        num_hidden_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        max_position_embeddings=4096,
        sliding_window=512,
    ),
    # The CPU quickstart (recipes/tiny/pretrain.yaml): 1.3M parameters with its 4,096-token tokenizer, half as wide
    # as tiny. Chosen by measurement: in the same 7.5 minutes on 2 cores it reads 3.9M tokens where tiny reads 1.9M,
    # and scores a lower held-out loss (docs/benchmarks.md).
    "quickstart": dict(
        **_SMALL,
        num_hidden_layers=4,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=4096,
        sliding_window=512,
    ),
    # Unit tests: about 0.1M parameters plus 64 per token of vocabulary; a window shorter than test sequences.
    "test": dict(
        **_SMALL,
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=1024,
        sliding_window=32,
    ),
}


def round_up(value: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def _apply_overrides(config, model_args: ModelArguments):
    if model_args.rope_theta is not None:
        config.rope_parameters = {
            **(config.rope_parameters or {"rope_type": "default"}),
            "rope_theta": model_args.rope_theta,
        }
    if model_args.max_position_embeddings is not None:
        config.max_position_embeddings = model_args.max_position_embeddings
    if model_args.sliding_window is not None:
        config.sliding_window = model_args.sliding_window
    if model_args.attention_dropout is not None:
        config.attention_dropout = model_args.attention_dropout
    return config


def build_config(model_args: ModelArguments, tokenizer_vocab_size: int):
    """The config of the model to train: a preset, a config.json, or a checkpoint's config; overrides applied.

    For a checkpoint (`model_name_or_path`) only the config is fetched; its vocab_size is left as is
    (create_model resizes the embeddings after loading the weights).
    """
    if model_args.model_name_or_path is not None:
        name = model_args.model_name_or_path
        try:
            config = AutoConfig.from_pretrained(
                name, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise RecipeError(
                f"model_name_or_path: could not load a model config from {name!r} ({error}); {hub_hint(name)}."
            ) from error
        return _apply_overrides(config, model_args)
    name = model_args.model_config
    needed = round_up(tokenizer_vocab_size)
    if name in MODEL_PRESETS:
        kwargs = copy.deepcopy(MODEL_PRESETS[name])
        kwargs.setdefault("vocab_size", needed)  # tiny, quickstart and test take the tokenizer's size
        config = Starcoder2Config(**kwargs)
    elif os.path.isfile(name):
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise RecipeError(f"model_config: {name} is not a readable config.json: {error}") from error
        if config.model_type != "starcoder2":
            raise RecipeError(f"model_config: {name} has model_type {config.model_type!r}, not 'starcoder2'.")
    else:
        raise RecipeError(
            f"model_config: {name!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing config.json."
        )
    if tokenizer_vocab_size > config.vocab_size:
        # A released architecture is reproduced exactly: a larger tokenizer is a mistake, not a resize.
        raise RecipeError(
            f"tokenizer_name_or_path: the tokenizer has {tokenizer_vocab_size} tokens but model_config {name} has an "
            f"embedding of {config.vocab_size}; use the StarCoder2 tokenizer (49152 tokens) or a config.json with "
            "a larger vocab_size."
        )
    return _apply_overrides(config, model_args)
