"""Single-line FIM exact match: problem building, prompts, batched generation, scoring."""

import time

import pytest
import torch
from transformers import Trainer, TrainingArguments

from starcoder2_train.configs import ModelArguments
from starcoder2_train.data.special_tokens import SpecialTokenIds
from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.evaluation.callback import EvaluationCallback
from starcoder2_train.evaluation.fim import (
    FimProblem,
    build_fim_problems,
    evaluate_fim,
    fim_prompts,
    infilled_line,
    prompt_prefix,
)
from starcoder2_train.evaluation.generation import generate_batched
from starcoder2_train.model.factory import create_model

FILES = [
    {
        "path": "calc/ops.py",
        "language": "Python",
        "content": "def add(a, b):\n    return a + b\n\n\ndef scale(values, k):\n    return [v * k for v in values]\n",
    },
    {
        "path": "util/strings.py",
        "language": "Python",
        "content": "import re\n\nWORD = re.compile(r'\\w+')\n\ndef words(text):\n    return WORD.findall(text)\n",
    },
    {
        "path": "web/greet.js",
        "language": "JavaScript",
        "content": "function greet(name) {\n  const text = `Hello, ${name}!`;\n  return text;\n}\n",
    },
    {
        "path": "web/sum.js",
        "language": "JavaScript",
        "content": "export function total(items) {\n  let sum = 0;\n  for (const x of items) sum += x;\n"
        "  return sum;\n}\n",
    },
    {
        "path": "src/main.rs",
        "language": "Rust",
        "content": 'fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!("{:?}", v);\n}\n',
    },
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two threads on two shared cores run tiny models ten times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    args = ModelArguments(model_config="test", torch_dtype="float32", attn_implementation="eager", sliding_window=1024)
    return create_model(args, tokenizer=tokenizer)


def test_problems_are_seeded_lines_that_rebuild_the_file():
    problems = build_fim_problems(FILES, seed=3)
    assert problems == build_fim_problems(list(reversed(FILES)), seed=3)[::-1]  # depends on (seed, path) only
    assert len(problems) == len(FILES)
    for problem, file in zip(problems, FILES):
        assert problem.prefix + problem.middle + problem.suffix == file["content"]
        assert "\n" not in problem.middle and len(problem.middle.strip()) >= 3
        assert problem.prefix == "" or problem.prefix.endswith("\n")
        assert problem.suffix.startswith("\n")
    chosen = {seed: [p.middle for p in build_fim_problems(FILES, seed=seed)] for seed in range(6)}
    assert len({tuple(middles) for middles in chosen.values()}) > 1, "the seed must change the masked lines"
    several = build_fim_problems(FILES[:1], seed=0, problems_per_file=10)
    assert len(several) == 4 and len({p.middle for p in several}) == 4  # every eligible line once, no blank


def test_held_out_problems_mask_several_lines_per_file_when_asked():
    """fim_eval_lines_per_file: the recipe's count reaches the problems the training evaluation scores."""
    from starcoder2_train.evaluation.held_out import fim_problems

    one, three = fim_problems(FILES, seed=0), fim_problems(FILES, seed=0, lines_per_file=3)
    assert len(one) == len(FILES) and len(three) == 3 * len(FILES)
    assert len({(p.path, p.prefix) for p in three}) == len(three)  # three different lines of each file
    assert len(fim_problems(FILES, seed=0, max_problems=4, lines_per_file=3)) == 4


def test_prompt_keeps_source_text_out_of_the_special_tokens(tokenizer):
    pieces, special = PieceTokenizer(tokenizer), SpecialTokenIds.from_tokenizer(tokenizer)
    problem = FimProblem(
        "a.py",
        "Python",
        prefix="s = '<fim_middle><|endoftext|>'\n",
        middle="x = 1",
        suffix="\nt = '<file_sep><fim_prefix>'\n",
    )
    (prompt,) = fim_prompts(pieces, [problem], max_prompt_tokens=1000)
    assert prompt[0] == special.fim_prefix and prompt[-1] == special.fim_middle
    assert [t for t in prompt if t in special.as_set()] == [special.fim_prefix, special.fim_suffix, special.fim_middle]
    split = prompt.index(special.fim_suffix)
    assert tokenizer.decode(prompt[1:split]) == problem.prefix[:-1]  # its last newline is the model's to write
    assert tokenizer.decode(prompt[split + 1 : -1]) == problem.suffix


def test_spm_prompt_holds_the_same_pieces_suffix_first(tokenizer):
    """SPM: <fim_prefix><fim_suffix>after<fim_middle>before, the very ids of the PSM prompt's two sides, so the
    prefix ends right where the model writes; an unknown order is refused."""
    pieces, special = PieceTokenizer(tokenizer), SpecialTokenIds.from_tokenizer(tokenizer)
    problems = build_fim_problems(FILES)
    for psm, spm in zip(fim_prompts(pieces, problems, 40), fim_prompts(pieces, problems, 40, mode="spm")):
        prefix = psm[1 : psm.index(special.fim_suffix)]
        suffix = psm[psm.index(special.fim_suffix) + 1 : -1]
        assert spm == [special.fim_prefix, special.fim_suffix, *suffix, special.fim_middle, *prefix]
    with pytest.raises(ValueError, match="mode 'msp' is not one of psm, spm"):
        fim_prompts(pieces, problems, 40, mode="msp")


def test_long_files_are_cut_away_from_the_hole(tokenizer):
    pieces, special = PieceTokenizer(tokenizer), SpecialTokenIds.from_tokenizer(tokenizer)
    prefix, suffix = "".join(f"a{i} = {i}\n" for i in range(200)), "".join(f"\nb{i} = {i}" for i in range(200))
    (prompt,) = fim_prompts(pieces, [FimProblem("a.py", "Python", prefix, "x = 1", suffix)], max_prompt_tokens=64)
    assert len(prompt) == 64
    split = prompt.index(special.fim_suffix)
    assert prompt_prefix(prefix).endswith(tokenizer.decode(prompt[1:split]))  # the end of the prefix is kept
    assert suffix.startswith(tokenizer.decode(prompt[split + 1 : -1]))  # the start of the suffix is kept
    assert abs(split - 1 - (64 - 3) // 2) <= 1  # both sides need room: it is shared
    (short,) = fim_prompts(pieces, [FimProblem("a.py", "Python", prefix, "x = 1", "\n")], max_prompt_tokens=64)
    suffix_tokens = len(pieces.encode_texts(["\n"])[0])
    assert len(short) == 64 and short.index(special.fim_suffix) == 1 + 61 - suffix_tokens  # the prefix takes the rest


def test_batched_left_padded_greedy_equals_one_at_a_time(tokenizer):
    model = tiny_model(tokenizer)
    with torch.no_grad():  # large random weights: what it writes depends on every token it sees
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    prompts = fim_prompts(PieceTokenizer(tokenizer), build_fim_problems(FILES), max_prompt_tokens=200)
    assert len({len(p) for p in prompts}) > 1, "the prompts must differ in length for padding to matter"
    kwargs = dict(stop_token_ids=[special.eos, special.file_sep], max_new_tokens=12)
    batched = generate_batched(model, tokenizer, prompts, batch_size=len(prompts), **kwargs)
    alone = generate_batched(model, tokenizer, prompts, batch_size=1, **kwargs)
    assert len({tuple(ids) for ids in alone}) == len(prompts), "outputs must differ for the test to mean much"
    assert batched == alone
    assert all(len(ids) <= 12 and not set(ids) & {special.eos, special.file_sep} for ids in batched)


def hole(problem: FimProblem) -> str:
    """What a FIM-trained model writes into the hole: the newline the prompt left out of the prefix, then the line."""
    return problem.prefix[len(prompt_prefix(problem.prefix)) :] + problem.middle


def memorise(model, prompts, targets, steps: int = 300, lr: float = 3e-3):
    """Train on prompt + target, loss on the target only, until the model reproduces every target."""
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention = torch.zeros_like(input_ids)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        ids = prompt + target
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(target)
        attention[row, : len(ids)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    return loss.item()


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_exact_match_is_high_when_memorised_and_zero_untrained(tokenizer, mode):
    start = time.monotonic()
    problems = build_fim_problems(FILES, seed=1)
    untrained = tiny_model(tokenizer, seed=1)
    metrics = evaluate_fim(untrained, tokenizer, problems, batch_size=4, max_new_tokens=24, mode=mode)
    assert metrics["exact_match"] == 0.0 and metrics["problems"] == len(FILES)

    pieces, special = PieceTokenizer(tokenizer), SpecialTokenIds.from_tokenizer(tokenizer)
    prompts = fim_prompts(pieces, problems, max_prompt_tokens=512, mode=mode)
    # The continuation a FIM-trained model writes: the line, then the end of the file (here: <|endoftext|>).
    targets = [ids + [special.eos] for ids in pieces.encode_texts([hole(p) for p in problems])]
    final_loss = memorise(untrained, prompts, targets)
    metrics, predictions = evaluate_fim(
        untrained, tokenizer, problems, batch_size=4, max_new_tokens=24, return_predictions=True, mode=mode
    )
    assert final_loss < 0.05
    assert metrics["exact_match"] >= 0.8, predictions
    assert set(metrics) >= {"exact_match/Python", "exact_match/JavaScript", "exact_match/Rust", "problems/Python"}
    assert metrics["problems/Python"] == 2 and metrics["problems/Rust"] == 1
    assert time.monotonic() - start < 90


def test_prediction_stops_at_the_first_newline(tokenizer):
    """A model that writes the line and goes on to the next still scores: only the first line counts."""
    problems = build_fim_problems(FILES[:2], seed=2)
    model = tiny_model(tokenizer, seed=2)
    pieces = PieceTokenizer(tokenizer)
    prompts = fim_prompts(pieces, problems, max_prompt_tokens=512)
    targets = pieces.encode_texts([hole(p) + "\nextra = 1\n" for p in problems])
    memorise(model, prompts, targets)
    metrics, predictions = evaluate_fim(model, tokenizer, problems, max_new_tokens=40, return_predictions=True)
    assert metrics["exact_match"] == 1.0, predictions
    assert all("\n" not in prediction for _, prediction in predictions)


def test_callback_logs_loss_and_fim_when_the_trainer_evaluates(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    rows = [
        {"input_ids": ids + [0], "language": file["language"]}
        for ids, file in zip(PieceTokenizer(tokenizer).encode_texts([f["content"] for f in FILES]), FILES)
    ]
    train = [
        {"input_ids": torch.tensor(row["input_ids"][:16]), "labels": torch.tensor(row["input_ids"][:16])}
        for row in rows
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=1,
        eval_strategy="steps",
        eval_steps=1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=train[:2])
    callback = EvaluationCallback(
        trainer, tokenizer, loss_dataset=rows, fim_problems=build_fim_problems(FILES), seq_length=64, max_new_tokens=8
    )
    trainer.add_callback(callback)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_fim/exact_match" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert {"eval_loss/loss/Python", "eval_loss/perplexity/Rust", "eval_fim/exact_match/JavaScript"} <= set(logged[0])
    assert callback.latest_results["loss"]["tokens"] == sum(len(row["input_ids"]) - 1 for row in rows)
    assert trainer.state.global_step == 2


def test_no_problem_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="no problems"):
        evaluate_fim(tiny_model(tokenizer), tokenizer, [])


def test_the_hole_opens_with_the_newline_the_prefix_ended_with(tokenizer):
    """The prompt stops where running code has a token boundary (a newline and the next line's indentation are one
    token), and a line written without that newline extends the line before: no match, and None as its line."""
    pieces, special = PieceTokenizer(tokenizer), SpecialTokenIds.from_tokenizer(tokenizer)
    prefix = "def f(x):\n    y = x\n"
    (prompt,) = fim_prompts(pieces, [FimProblem("a.py", "Python", prefix, "    return y", "\n")], 100)
    assert prompt[1 : prompt.index(special.fim_suffix)] == pieces.encode_texts(["def f(x):\n    y = x"])[0]
    assert infilled_line("\n    return y\nz = 1", prefix) == "    return y"
    assert infilled_line("    return y", prefix) is None and infilled_line("return y\n", "") == "return y"

    problems = [p for p in build_fim_problems(FILES[:2], seed=2) if p.prefix]
    model = tiny_model(tokenizer, seed=3)
    prompts = fim_prompts(pieces, problems, max_prompt_tokens=512)
    memorise(model, prompts, pieces.encode_texts([p.middle + "\n" for p in problems]))  # no newline first
    kwargs = dict(stop_token_ids=[special.eos, special.file_sep], max_new_tokens=8, batch_size=4)
    free = tokenizer.batch_decode(generate_batched(model, tokenizer, prompts, **kwargs))
    assert [infilled_line(text, p.prefix) for text, p in zip(free, problems)] == [None] * len(problems)
    # The evaluation heals the token: the first one it takes starts with the newline the prompt left out.
    metrics, predictions = evaluate_fim(model, tokenizer, problems, max_new_tokens=40, return_predictions=True)
    assert all(line is not None for _, line in predictions), predictions


def test_first_texts_constrain_only_the_first_token_of_their_rows(tokenizer):
    """Token healing in generate_batched: a row with a first text starts with a token beginning with that text;
    a row with "" generates as it would unconstrained, in the same batch; a text no token starts with is refused."""
    model = tiny_model(tokenizer, seed=4)
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    prompts = fim_prompts(PieceTokenizer(tokenizer), build_fim_problems(FILES), max_prompt_tokens=200)
    kwargs = dict(stop_token_ids=[special.eos, special.file_sep], max_new_tokens=6, batch_size=len(prompts))
    free = generate_batched(model, tokenizer, prompts, **kwargs)
    firsts = ["\n" if row % 2 else "" for row in range(len(prompts))]
    healed = generate_batched(model, tokenizer, prompts, first_texts=firsts, **kwargs)
    assert any(not tokenizer.decode(free[row][:1]).startswith("\n") for row in range(1, len(prompts), 2)), (
        "the untrained model must not start with a newline by itself for the test to mean much"
    )
    for row, (first, ids) in enumerate(zip(firsts, healed)):
        if first:
            assert ids and tokenizer.decode(ids[:1]).startswith("\n"), (row, tokenizer.decode(ids))
        else:
            assert ids == free[row]
    with pytest.raises(ValueError, match="no token of the tokenizer starts with"):
        generate_batched(model, tokenizer, prompts, first_texts=["\u2603\u2603\u2603"] * len(prompts), **kwargs)
