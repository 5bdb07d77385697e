"""HumanEval is scored by the rules of bigcode-evaluation-harness's `humaneval` task.

The expected programs below are written by hand from the harness's rules (bigcode_eval/tasks/humaneval.py and
bigcode_eval/base.py): the generation prompt is the problem's prompt stripped of leading and trailing whitespace;
the program is that prompt followed by the generation cut before the earliest of the stop words
"\\nclass", "\\ndef", "\\n#", "\\n@", "\\nprint", "\\nif", "\\n```", "<file_sep>" and the eos token, searched
for as text in the generation only; the tests run as program + "\\n" + "\\n" + test + "\\n" + "check(entry_point)".
"""

import dataclasses

import pytest

from starcoder2_train.evaluation import humaneval
from starcoder2_train.evaluation.execution import CodeExecutionNotAllowed
from starcoder2_train.evaluation.humaneval import (
    evaluate_humaneval,
    generate_completions,
    generate_programs,
    generation_prompt,
    harness_program,
    harness_reference,
    harness_test_program,
    load_humaneval_problems,
    score_programs,
    stop_words,
    task_prompt,
    truncate_completion,
)
from starcoder2_train.evaluation.humaneval_settings import (
    GREEDY,
    HARNESS_DEFAULTS,
    HUMANEVAL_STOP_SEQUENCES,
    STARCODER2_PASS_AT_1,
    HumanEvalSettings,
)

PROBLEM = {
    "task_id": "Test/0",
    "prompt": 'def f(x):\n    """Return x."""\n',
    "entry_point": "f",
    "canonical_solution": "    return x\n",
    "test": "def check(candidate):\n    assert candidate(1) == 1\n",
}
STRIPPED = 'def f(x):\n    """Return x."""'

# (what the model wrote after the stripped prompt, the program the harness executes)
ROWS = {
    "runs into a new def": (
        "\n    return x\n\n\ndef g():\n    return 2\n",
        'def f(x):\n    """Return x."""\n    return x\n\n',
    ),
    "runs into a class": (
        "\n    return x\nclass A:\n    pass\n",
        'def f(x):\n    """Return x."""\n    return x',
    ),
    "runs into if __name__": (
        "\n    return x\n\nif __name__ == '__main__':\n    print(f(1))\n",
        'def f(x):\n    """Return x."""\n    return x\n',
    ),
    "runs into a print": (
        "\n    return x\nprint(f(2))\n",
        'def f(x):\n    """Return x."""\n    return x',
    ),
    "runs into a comment at column 0": (
        "\n    return x\n# tests\nassert f(1) == 1\n",
        'def f(x):\n    """Return x."""\n    return x',
    ),
    "runs into a decorator (before a def: the earliest stop wins)": (
        "\n    return x\n\n\n@functools.cache\ndef g():\n    pass\n",
        'def f(x):\n    """Return x."""\n    return x\n\n',
    ),
    "runs into a markdown fence": (
        "\n    return x\n```\n\nThis function returns x.\n",
        'def f(x):\n    """Return x."""\n    return x',
    ),
    "ends with the eos token's text": (
        "\n    return x\n<|endoftext|>def g():\n",
        'def f(x):\n    """Return x."""\n    return x\n',
    ),
    "ends with <file_sep>": (
        "\n    return x\n<file_sep>utils.py\nimport os\n",
        'def f(x):\n    """Return x."""\n    return x\n',
    ),
    "indented if, print, # and @ do not cut": (
        '\n    if x:\n        print("#", "\\ndef")\n    # class\n    @property\n    return x\n',
        'def f(x):\n    """Return x."""\n    if x:\n        print("#", "\\ndef")\n    # class\n    @property\n'
        "    return x\n",
    ),
    "a stop at column 0 inside a string still cuts (the rule is textual)": (
        '\n    s = """\ndef in a string\n"""\n    return x\n',
        'def f(x):\n    """Return x."""\n    s = """',
    ),
    "a stop is a prefix, not a word: \\nprinter cuts": (
        "\nprinter = 1\n",
        'def f(x):\n    """Return x."""',
    ),
    "CRLF: the cut is at the \\n, the \\r stays": (
        "\r\n    return x\r\n\r\ndef g():\r\n    pass\r\n",
        'def f(x):\n    """Return x."""\r\n    return x\r\n\r',
    ),
    "empty generation": ("", 'def f(x):\n    """Return x."""'),
    "a stop right away leaves the prompt": ("\ndef g():\n    return 1\n", 'def f(x):\n    """Return x."""'),
    "no stop at all: kept whole": (
        "\n    y = x\n    return y",
        'def f(x):\n    """Return x."""\n    y = x\n    return y',
    ),
}


@pytest.fixture(autouse=True)
def allowed(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


@pytest.fixture(scope="module")
def problems():
    return load_humaneval_problems()


@pytest.mark.parametrize("generation, expected", ROWS.values(), ids=ROWS.keys())
def test_program_from_the_whole_decoded_output(generation, expected):
    """The harness decodes prompt + generation and drops len(prompt) characters before cutting."""
    assert harness_program(PROBLEM, STRIPPED + generation) == expected


@pytest.mark.parametrize("generation, expected", ROWS.values(), ids=ROWS.keys())
def test_program_from_the_generation_alone(generation, expected):
    assert harness_program(PROBLEM, generation, includes_prompt=False) == expected


PROMPT_ROWS = {
    "trailing blanks and newlines are stripped": (
        'def f(x):\n    """Return x."""\n  \n\n\t\n',
        HARNESS_DEFAULTS,
        'def f(x):\n    """Return x."""' + "\n    return x\nprint(f(1))\n",
        'def f(x):\n    """Return x."""\n    return x',
    ),
    "leading newlines are stripped": (
        '\n\n\ndef f(x):\n    """Return x."""\n',
        HARNESS_DEFAULTS,
        'def f(x):\n    """Return x."""' + "\n    return x\n\n\ndef g():\n",
        'def f(x):\n    """Return x."""\n    return x\n\n',
    ),
    "the prompt's own stop words never cut": (
        "from typing import List\n\n\ndef helper():\n    # inner\n    pass\n\n\n# note\ndef f(x):\n"
        '    """Return x."""\n',
        HARNESS_DEFAULTS,
        'from typing import List\n\n\ndef helper():\n    # inner\n    pass\n\n\n# note\ndef f(x):\n    """Return x."""'
        "\n    return x\n\ndef g",
        'from typing import List\n\n\ndef helper():\n    # inner\n    pass\n\n\n# note\ndef f(x):\n    """Return x."""'
        "\n    return x\n",
    ),
    "humaneval-unstripped keeps the prompt as it is": (
        '\ndef f(x):\n    """Return x."""\n',
        dataclasses.replace(HARNESS_DEFAULTS, strip_prompt=False),
        '\ndef f(x):\n    """Return x."""\n    return x\n\n\ndef g():\n',
        '\ndef f(x):\n    """Return x."""\n    return x\n\n',
    ),
    "a prefix is fed to the model but is not in the program": (
        'def f(x):\n    """Return x."""\n',
        dataclasses.replace(HARNESS_DEFAULTS, prefix="<| file ext=.py |>\n"),
        '<| file ext=.py |>\ndef f(x):\n    """Return x."""\n    return x\n#',
        'def f(x):\n    """Return x."""\n    return x',
    ),
    "without the eos stop word its text stays": (
        'def f(x):\n    """Return x."""\n',
        dataclasses.replace(HARNESS_DEFAULTS, stop_at_eos=False),
        'def f(x):\n    """Return x."""\n    return x\n<|endoftext|>',
        'def f(x):\n    """Return x."""\n    return x\n<|endoftext|>',
    ),
}


@pytest.mark.parametrize("prompt, settings, output, expected", PROMPT_ROWS.values(), ids=PROMPT_ROWS.keys())
def test_prompt_handling(prompt, settings, output, expected):
    assert harness_program({**PROBLEM, "prompt": prompt}, output, settings=settings) == expected


def test_the_eos_stop_word_is_the_tokenizers():
    generation = "\n    return x\n</s>junk\n<|endoftext|>"
    assert harness_program(PROBLEM, generation, includes_prompt=False, eos_token="</s>") == (
        'def f(x):\n    """Return x."""\n    return x\n'
    )
    assert harness_program(PROBLEM, generation, includes_prompt=False) == (
        'def f(x):\n    """Return x."""\n    return x\n</s>junk\n'
    )


def test_stop_lists():
    assert HUMANEVAL_STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
    assert stop_words() == HUMANEVAL_STOP_SEQUENCES + ("<|endoftext|>",)
    assert stop_words(eos_token=None) == HUMANEVAL_STOP_SEQUENCES
    assert truncate_completion("    return 1\n\nif True:\n") == "    return 1\n"  # old default argument


def test_generation_prompts_of_real_problems(problems):
    first, third = problems[0], problems[2]
    assert generation_prompt(first).startswith("from typing import List\n\n\ndef has_close_elements(")
    assert generation_prompt(first).endswith('    True\n    """')
    assert generation_prompt(first) == first["prompt"][:-1]  # one trailing newline, nothing leading
    assert generation_prompt(third).startswith("def truncate_number(number: float) -> float:\n")
    assert generation_prompt(third) == third["prompt"][2:-1]  # two leading newlines, one trailing
    unstripped = dataclasses.replace(HARNESS_DEFAULTS, strip_prompt=False)
    prefixed = dataclasses.replace(HARNESS_DEFAULTS, prefix="# language: Python\n")
    for problem in problems:
        prompt = generation_prompt(problem)
        lead = problem["prompt"][: problem["prompt"].index(prompt)]
        assert lead.isspace() or lead == ""
        assert problem["prompt"] == lead + prompt + "\n"  # every HumanEval prompt ends in exactly one newline
        assert generation_prompt(problem, unstripped) == problem["prompt"]
        assert generation_prompt(problem, prefixed) == "# language: Python\n" + prompt
        assert task_prompt(problem, prefixed) == prompt


def test_reference_and_executed_text(problems):
    assert harness_reference(PROBLEM) == "\ndef check(candidate):\n    assert candidate(1) == 1\n\ncheck(f)"
    assert harness_test_program(PROBLEM, "PROGRAM") == (
        "PROGRAM\n\ndef check(candidate):\n    assert candidate(1) == 1\n\ncheck(f)"
    )
    assert harness_reference(problems[0]).endswith("\ncheck(has_close_elements)")


def test_settings_are_the_harness_defaults():
    assert HARNESS_DEFAULTS == HumanEvalSettings(
        strip_prompt=True,
        prefix="",
        stop_sequences=("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"),
        stop_at_eos=True,
        do_sample=True,
        temperature=0.2,
        top_p=0.95,
        top_k=0,
        n_samples=1,
        batch_size=1,
        max_length_generation=512,
        seed=0,
        precision="fp32",
        k=(1, 10, 100),
        timeout=3.0,
        num_workers=16,
    )
    assert (STARCODER2_PASS_AT_1.n_samples, STARCODER2_PASS_AT_1.temperature, STARCODER2_PASS_AT_1.top_p) == (
        50,
        0.2,
        0.95,
    )
    assert STARCODER2_PASS_AT_1.max_length_generation == 512 and STARCODER2_PASS_AT_1.k == (1,)
    assert (GREEDY.do_sample, GREEDY.n_samples) == (False, 1)
    for setting in dataclasses.fields(HumanEvalSettings):
        assert setting.metadata["source"], setting.name
        assert f"- {setting.name}: " in HumanEvalSettings.__doc__
    with pytest.raises(dataclasses.FrozenInstanceError):
        HARNESS_DEFAULTS.temperature = 0.8


def test_settings_as_evaluate_kwargs(monkeypatch):
    assert GREEDY.evaluate_kwargs()["temperature"] == 0.0
    kwargs = STARCODER2_PASS_AT_1.evaluate_kwargs()
    assert kwargs["num_samples"] == 50 and kwargs["max_length_generation"] == 512 and kwargs["strip_prompt"]
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")
    with pytest.raises(CodeExecutionNotAllowed):  # every key binds (else TypeError), then the opt-in is checked
        evaluate_humaneval(None, None, limit=1, **kwargs)


class FakeGenerator:
    """Stands in for generate_batched: records each call and answers with fixed token ids per prompt."""

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer, self.calls = tokenizer, answer, []

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls.append({"prompts": prompts, **kwargs})
        return [list(self.answer(self.tokenizer.decode(prompt)))[: kwargs["max_new_tokens"]] for prompt in prompts]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_max_length_counts_the_prompt_tokens(tokenizer, problems, monkeypatch):
    chosen = problems[:3]
    lengths = [len(tokenizer(generation_prompt(p)).input_ids) for p in chosen]  # as the harness tokenizes
    filler = encode(tokenizer, "\n    value = 1" + " + 1" * 400)
    fake = FakeGenerator(tokenizer, lambda prompt: filler)
    monkeypatch.setattr(humaneval, "generate_batched", fake)
    limit = sorted(lengths)[1] + 7  # the shortest prompts get 7 and more tokens, the longest none
    settings = dataclasses.replace(HARNESS_DEFAULTS, max_length_generation=limit, batch_size=8)
    programs = generate_programs(None, tokenizer, chosen, settings)
    sent = [prompt for call in fake.calls for prompt in call["prompts"]]
    assert sorted(map(tuple, sent)) == sorted(
        tuple(tokenizer(generation_prompt(p)).input_ids) for p, n in zip(chosen, lengths) if n < limit
    )
    assert [call["max_new_tokens"] for call in fake.calls] == [limit - min(lengths)]
    for problem, length, candidates in zip(chosen, lengths, programs):
        budget = max(limit - length, 0)
        assert candidates == [generation_prompt(problem) + tokenizer.decode(filler[:budget])]
    assert any(length >= limit for length in lengths)  # one prompt had no room: its program is the prompt


def test_sampling_settings_reach_generate(tokenizer, problems, monkeypatch):
    fake = FakeGenerator(tokenizer, lambda prompt: encode(tokenizer, "\n    return 0\n\ndef junk():\n"))
    monkeypatch.setattr(humaneval, "generate_batched", fake)
    sampled = generate_completions(None, tokenizer, problems[:2], num_samples=3, batch_size=4)
    call = fake.calls[0]
    assert (call["do_sample"], call["temperature"], call["top_p"]) == (True, 0.2, 0.95)
    assert set(call["stop_texts"]) == set(HUMANEVAL_STOP_SEQUENCES) | {"<|endoftext|>"}
    assert sum(len(c["prompts"]) for c in fake.calls) == 6  # 3 rows per problem
    assert sampled == [["    return 0\n"] * 3] * 2  # completions of the original prompt (its "\n" taken off)
    fake.calls.clear()
    greedy = generate_completions(None, tokenizer, problems[:2], num_samples=3, temperature=0.0)
    assert [c["do_sample"] for c in fake.calls] == [False] and len(fake.calls[0]["prompts"]) == 2
    assert greedy == sampled


def test_special_tokens_are_decoded_as_text(tokenizer, problems, monkeypatch):
    """The harness decodes with skip_special_tokens=False: a stray special token stays in the program."""
    middle = tokenizer.convert_tokens_to_ids("<fim_middle>")
    answer = encode(tokenizer, "\n    return 0") + [middle] + encode(tokenizer, "\n\ndef junk():\n")
    monkeypatch.setattr(humaneval, "generate_batched", FakeGenerator(tokenizer, lambda prompt: answer))
    [[program]] = generate_programs(None, tokenizer, problems[:1])
    assert program == generation_prompt(problems[0]) + "\n    return 0<fim_middle>\n"


def answer_with(problems, tokenizer, before: str):
    """A fake model that writes `before`, then the canonical solution, then more code after a stop word."""
    by_prompt = {generation_prompt(p): p for p in problems}
    return lambda prompt: encode(tokenizer, before + "\n" + by_prompt[prompt]["canonical_solution"] + "\ndef more():")


# The test tokenizer has 600 tokens: some canonical solutions need more than 512 - prompt of them.
ROOMY = dataclasses.replace(HARNESS_DEFAULTS, max_length_generation=4096)


def test_canonical_solutions_pass_and_cut_ones_fail(problems, tokenizer, monkeypatch):
    chosen = problems[:4]
    fake = FakeGenerator(tokenizer, answer_with(chosen, tokenizer, ""))
    monkeypatch.setattr(humaneval, "generate_batched", fake)
    programs = generate_programs(None, tokenizer, chosen, ROOMY)
    assert [p[0] for p in programs] == [task_prompt(p) + "\n" + p["canonical_solution"] for p in chosen]
    pass_at_k, _ = score_programs(chosen, programs, num_workers=2)
    assert pass_at_k == {"pass@1": 1.0}
    fake.answer = answer_with(chosen, tokenizer, "\nprint('solving')")  # a stop before the body: cut away
    cut = generate_programs(None, tokenizer, chosen, ROOMY)
    assert [p[0] for p in cut] == [task_prompt(p) for p in chosen]
    pass_at_k, results = score_programs(chosen, cut, num_workers=2)
    assert pass_at_k == {"pass@1": 0.0}, results


def test_evaluate_humaneval_end_to_end(problems, tokenizer, monkeypatch):
    fake = FakeGenerator(tokenizer, answer_with(problems[:2], tokenizer, ""))
    monkeypatch.setattr(humaneval, "generate_batched", fake)
    kwargs = dict(limit=2, num_workers=2, max_length_generation=4096)
    metrics = evaluate_humaneval(None, tokenizer, num_samples=2, k=(1, 2), **kwargs)
    assert metrics == {"pass@1": 1.0, "pass@2": 1.0, "problems": 2, "samples": 2, "temperature": 0.2}
    fake.answer = answer_with(problems[:2], tokenizer, "\n# first, a comment at column 0")
    metrics = evaluate_humaneval(None, tokenizer, num_samples=2, k=(1,), **kwargs)
    assert metrics["pass@1"] == 0.0


def test_top_k_reaches_generate(tokenizer, problems, monkeypatch):
    """The harness's --top_k is passed on, 0 (its default, no top-k) included: never left for transformers to fill."""
    fake = FakeGenerator(tokenizer, lambda prompt: encode(tokenizer, "\n    return 0\n"))
    monkeypatch.setattr(humaneval, "generate_batched", fake)
    for top_k in (0, 40):
        generate_programs(None, tokenizer, problems[:1], dataclasses.replace(HARNESS_DEFAULTS, top_k=top_k))
        assert fake.calls.pop()["top_k"] == top_k
