"""scripts/evaluate.py's HumanEval budget: --max_length_generation (prompt + generation, the harness's 512) alone;
--max_new_tokens is FIM's budget and leaves HumanEval's alone."""

import pytest
from conftest import load_script
from test_humaneval_rules import FakeGenerator, encode

from starcoder2_train.evaluation import humaneval
from starcoder2_train.evaluation.humaneval import generation_prompt, load_humaneval_problems


class FakeModel:
    def to(self, device):
        return self

    def eval(self):
        return self


@pytest.fixture
def script(tokenizer, monkeypatch):
    """scripts/evaluate.py with a stand-in model and the test tokenizer; generate_batched answers a long line."""
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    module = load_script("evaluate")
    monkeypatch.setattr(module, "load_tokenizer", lambda name: tokenizer)
    monkeypatch.setattr(module.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: FakeModel())
    fake = FakeGenerator(tokenizer, lambda prompt: encode(tokenizer, "\n    value = 1" + " + 1" * 800))
    monkeypatch.setattr(humaneval, "generate_batched", fake)
    return module, fake


def test_max_new_tokens_does_not_cap_the_humaneval_budget(script, tokenizer):
    module, fake = script
    prompt = tokenizer(generation_prompt(load_humaneval_problems(1)[0])).input_ids
    common = ["model", "--tasks", "humaneval", "--limit", "1", "--num_workers", "1", "--disable_tqdm"]
    module.main([*common, "--max_new_tokens", "16"])
    assert [call["max_new_tokens"] for call in fake.calls] == [512 - len(prompt)]
    fake.calls.clear()
    module.main([*common, "--max_length_generation", str(len(prompt) + 9)])  # the option that names the budget
    assert [call["max_new_tokens"] for call in fake.calls] == [9]
