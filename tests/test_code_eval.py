"""pass@k: the estimator, the offline code_eval metric on HumanEval, and sampling with a tiny model."""

import math
import sys

import pytest
import torch

from starcoder2_train.configs import ModelArguments
from starcoder2_train.evaluation.execution import CodeExecutionNotAllowed
from starcoder2_train.evaluation.humaneval import (
    HUMANEVAL_STOP_SEQUENCES,
    completion_after,
    evaluate_humaneval,
    generate_completions,
    load_code_eval_metric,
    load_humaneval_problems,
    score_completions,
    truncate_completion,
)
from starcoder2_train.model.factory import create_model


@pytest.fixture(autouse=True)
def allowed(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


@pytest.fixture(scope="module")
def metric():
    return load_code_eval_metric()


@pytest.fixture(scope="module")
def problems():
    return load_humaneval_problems()


def estimator(metric):
    """estimate_pass_at_k from the metric module as evaluate loaded it (from its own copy of the script)."""
    return sys.modules[type(metric).__module__].estimate_pass_at_k


@pytest.mark.parametrize(
    "n, c, k",
    [
        (1, 0, 1),
        (1, 1, 1),
        (5, 2, 1),
        (5, 2, 2),
        (5, 2, 3),
        (5, 2, 4),
        (10, 0, 5),
        (10, 10, 10),
        (20, 3, 10),
        (200, 17, 1),
        (200, 17, 10),
        (200, 17, 100),
        (200, 190, 100),
    ],
)
def test_estimator_matches_the_closed_form(metric, n, c, k):
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert estimator(metric)(n, c, k)[0] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_metric_works_offline_and_counts_per_problem(metric):
    good, bad = "def f():\n    return 1\n", "def f():\n    return 2\n"
    pass_at_k, results = metric.compute(
        predictions=[[good, bad, bad, good], [bad, bad, bad, bad]],
        references=["assert f() == 1"] * 2,
        k=[1, 2],
        num_workers=2,
    )
    assert pass_at_k["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert pass_at_k["pass@2"] == pytest.approx((1 - math.comb(2, 2) / math.comb(4, 2)) / 2)
    assert [r["passed"] for _, r in results[0]] == [True, False, False, True]
    assert results[1][0][1]["result"] == "failed: AssertionError"


def test_canonical_solutions_pass(problems):
    pass_at_k, results = score_completions(problems, [[p["canonical_solution"]] for p in problems], num_workers=2)
    assert len(problems) == 164
    assert pass_at_k == {"pass@1": 1.0}, [r for rows in results.values() for _, r in rows if not r["passed"]]


def test_broken_solutions_fail(problems):
    subset = problems[:12]
    broken = [
        ["    raise NotImplementedError\n", "    return (\n", "    assert False\n" + p["canonical_solution"]]
        for p in subset
    ]
    pass_at_k, results = score_completions(subset, broken, k=[1, 3], num_workers=2)
    assert pass_at_k == {"pass@1": 0.0, "pass@3": 0.0}


def test_looping_and_allocating_solutions_fail_and_others_still_pass(problems):
    problem = problems[0]
    loop = "    while True:\n        pass\n"
    allocate = "    x = []\n    while True:\n        x.append(bytearray(1 << 20))\n"
    candidates = [loop, allocate, problem["canonical_solution"]]
    pass_at_k, results = score_completions([problem], [candidates], k=[1], num_workers=2, timeout=1.0)
    outcomes = [r for _, r in results[0]]
    assert outcomes[0]["result"].startswith("timed out")
    assert "MemoryError" in outcomes[1]["result"] or outcomes[1]["result"].startswith("timed out")
    assert outcomes[2]["passed"] and pass_at_k["pass@1"] == pytest.approx(1 / 3)


def test_refused_without_the_opt_in(metric, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")
    with pytest.raises(CodeExecutionNotAllowed, match="HF_ALLOW_CODE_EVAL=1"):
        metric.compute(predictions=[["x = 1"]], references=["assert x == 1"], k=[1])
    with pytest.raises(CodeExecutionNotAllowed):
        evaluate_humaneval(None, None, limit=1)  # refused before any generation


def test_truncation_at_the_stop_sequences():
    body = "    return x\n"
    assert truncate_completion(body) == body
    for stop in HUMANEVAL_STOP_SEQUENCES:
        assert truncate_completion(body + stop + " more\n") == body
    assert truncate_completion(body + "\nprint(1)\n\ndef g():\n") == body


def test_completions_follow_the_original_prompt(problems):
    """Generation starts after prompt.rstrip(); the completion must still follow the prompt as given."""
    prompt = 'def f():\n    """Doc."""\n'
    assert completion_after(prompt, "\n    return 1\n") == "    return 1\n"
    assert completion_after(prompt, " return 1") == " return 1"  # cannot be aligned: kept as written
    problem = problems[2]
    generated = problem["prompt"][len(problem["prompt"].rstrip()) :] + problem["canonical_solution"]
    assert completion_after(problem["prompt"], generated) == problem["canonical_solution"]


def test_sampling_with_a_tiny_model(tokenizer, problems):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
        kwargs = dict(num_samples=3, temperature=0.8, max_new_tokens=12, batch_size=4)
        first = generate_completions(model, tokenizer, problems[:2], **kwargs)
        again = generate_completions(model, tokenizer, problems[:2], **kwargs)
        greedy = generate_completions(model, tokenizer, problems[:2], **{**kwargs, "temperature": 0.0})
        metrics = evaluate_humaneval(model, tokenizer, limit=2, k=(1, 2), **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert first == again  # seeded
    assert [len(c) for c in first] == [3, 3] and len(set(first[0])) > 1  # n samples, not n copies
    assert all(len(set(c)) == 1 for c in greedy)
    assert all(not any(stop in text for stop in HUMANEVAL_STOP_SEQUENCES) for c in first for text in c)
    assert metrics == {"pass@1": 0.0, "pass@2": 0.0, "problems": 2, "samples": 3, "temperature": 0.8}
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_humaneval(model, tokenizer, limit=1, num_samples=1, k=(10,))
