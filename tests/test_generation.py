"""Sampling settings as transformers' generate resolves them, read from a tiny random Starcoder2 model's call.

transformers 5.25 (generation/utils.py, `_prepare_generation_config`) fills every field left None with the model's
generation_config and then with `GenerationConfig._get_default_generation_params()`, whose top_k is 50; an explicit
0 is kept, and `_get_logits_processor` adds a TopKLogitsWarper only for a top_k other than None and 0.
bigcode-evaluation-harness (HEAD 8fc5bae, bigcode_eval/generation.py) passes top_k=args.top_k, default 0.
"""

import dataclasses

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from starcoder2_train.configs import ModelArguments
from starcoder2_train.evaluation.generation import generate_batched
from starcoder2_train.evaluation.humaneval import HARNESS_DEFAULTS, generate_programs, load_humaneval_problems
from starcoder2_train.model.factory import create_model


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)


@pytest.fixture
def resolved(model, monkeypatch):
    """Each generate call's resolved GenerationConfig and the logits processors built from it."""
    calls = []
    real = model._get_logits_processor

    def spy(*args, **kwargs):
        processors = real(*args, **kwargs)
        calls.append((kwargs.get("generation_config", args[0] if args else None), processors))
        return processors

    monkeypatch.setattr(model, "_get_logits_processor", spy)
    return calls


def warpers(processors, kind):
    return [processor for processor in processors if isinstance(processor, kind)]


def test_sampling_without_top_k_is_not_filled_with_50(model, tokenizer, resolved, monkeypatch):
    monkeypatch.setattr(model.generation_config, "top_k", 7)  # a checkpoint's generation_config.json may set one
    prompts = [tokenizer("def f(x):", add_special_tokens=False).input_ids]
    stop = [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    kwargs = dict(stop_token_ids=stop, max_new_tokens=2, batch_size=1, do_sample=True, temperature=0.2, top_p=0.95)
    generate_batched(model, tokenizer, prompts, disable_progress=True, **kwargs)
    [(config, processors)] = resolved
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.2, 0.95, 0)
    assert not warpers(processors, TopKLogitsWarper)
    generate_batched(model, tokenizer, prompts, disable_progress=True, top_k=5, **kwargs)
    assert resolved[1][0].top_k == 5 and [w.top_k for w in warpers(resolved[1][1], TopKLogitsWarper)] == [5]


def test_humaneval_samples_as_the_harness(model, tokenizer, resolved):
    """do_sample, temperature 0.2, top_p 0.95, top_k 0: bigcode_eval/arguments.py EvalArguments defaults."""
    settings = dataclasses.replace(HARNESS_DEFAULTS, n_samples=2, batch_size=2)
    generate_programs(model, tokenizer, load_humaneval_problems(1), settings, max_new_tokens=2)
    [(config, processors)] = resolved
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.2, 0.95, 0)
    assert [w.temperature for w in warpers(processors, TemperatureLogitsWarper)] == [0.2]
    assert [w.top_p for w in warpers(processors, TopPLogitsWarper)] == [0.95]
    assert not warpers(processors, TopKLogitsWarper)
