"""The held-out set (evaluation/held_out_set.py): bounded, drawn by seed across repositories, built once, and
scored split across ranks with the same figures as one rank (a real 2-process gloo run)."""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_ENV, random_repositories
from datasets import Dataset

from starcoder2_train.configs import ModelArguments
from starcoder2_train.evaluation import held_out_set
from starcoder2_train.evaluation.fim import evaluate_fim
from starcoder2_train.evaluation.held_out import loss_rows as list_loss_rows
from starcoder2_train.evaluation.loss import evaluate_loss
from starcoder2_train.evaluation.ranks import share
from starcoder2_train.model.factory import create_model

REPOSITORIES = random_repositories(60, seed=5, max_files=6)


def build(tmp_path, tokenizer, repositories=REPOSITORIES, seed=1, tokens=400, problems=24, lines=1):
    return held_out_set.ensure_held_out_set(
        repositories,
        tokenizer,
        str(tmp_path),
        seed=seed,
        tokens_per_language=tokens,
        fim_problems=problems,
        fim_lines_per_file=lines,
    )


def repository_of(path: str) -> str:
    return "/".join(path.split("/")[:2])


def test_bounded_per_language_and_the_last_row_cut(tmp_path, tokenizer):
    built = build(tmp_path, tokenizer, tokens=400)
    assert built.languages == sorted(built.languages) and len(built.languages) == 4
    assert built.manifest["tokens"] == [400] * 4  # each language filled to its bound exactly
    rows = built.loss_rows
    per_language = Counter()
    for row in range(len(rows)):
        per_language[rows.language(row)] += int(rows.lengths[row])
    assert dict(per_language) == dict.fromkeys(built.languages, 400)


def test_files_drawn_by_seed_across_repositories_not_their_order(tmp_path, tokenizer):
    problems = build(tmp_path / "a", tokenizer, problems=40).fim_problems()
    # round robin over the languages: each language gives 10 of the 40, each from another repository
    assert Counter(problem.language for problem in problems) == dict.fromkeys(
        ["C", "JavaScript", "Python", "Rust"], 10
    )
    for language in ("C", "Python"):
        names = [repository_of(problem.path) for problem in problems if problem.language == language]
        assert len(set(names)) == len(names) == 10
    first = {repository_of(problem.path) for problem in problems}
    assert not first <= {repo["repo_name"] for repo in REPOSITORIES[:15]}  # not the first repositories
    reordered = build(tmp_path / "b", tokenizer, repositories=REPOSITORIES[::-1], problems=40).fim_problems()
    assert sorted(p.path for p in reordered) == sorted(p.path for p in problems)  # the seed decides, not the order
    other_seed = build(tmp_path / "c", tokenizer, seed=2, problems=40).fim_problems()
    assert {p.path for p in other_seed} != {p.path for p in problems}


def test_built_once_then_opened_and_a_changed_bound_is_a_new_set(tmp_path, tokenizer, monkeypatch):
    first = build(tmp_path, tokenizer)
    calls = []
    monkeypatch.setattr(held_out_set, "build_held_out_set", lambda *args: calls.append(args))
    again = build(tmp_path, tokenizer, repositories=Dataset.from_list(REPOSITORIES))  # a Dataset: the same set
    assert again.directory == first.directory and not calls
    monkeypatch.undo()
    assert build(tmp_path, tokenizer, tokens=300).directory != first.directory
    assert not list(tmp_path.glob("*.building-*"))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return create_model(
        ModelArguments(model_config="test", torch_dtype="float32", attn_implementation="eager"), tokenizer=tokenizer
    )


def test_token_rows_score_as_the_same_rows_in_python_lists(tmp_path, tokenizer, model):
    built = build(tmp_path, tokenizer, tokens=0)  # every file, whole
    files = [
        {"path": f"{repo['repo_name']}/{file['path']}", "content": file["content"], "language": file["language"]}
        for repo in REPOSITORIES
        for file in repo["files"]
    ]
    stored = evaluate_loss(model, built.loss_rows, seq_length=32, batch_size=8)
    listed = evaluate_loss(model, list_loss_rows(tokenizer, files), seq_length=32, batch_size=8)
    assert stored.keys() == listed.keys()
    for key, value in listed.items():
        assert stored[key] == pytest.approx(value, rel=1e-6), key


def test_shares_cover_every_item_once_and_have_one_length():
    shares = [share(7, rank, 3) for rank in range(3)]
    assert {len(items) for items in shares} == {3}
    assert sorted(i for items in shares for i in items if i is not None) == list(range(7))
    with pytest.raises(ValueError, match="rank 3"):
        share(7, 3, 3)


RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from transformers import AutoTokenizer
sys.path.insert(0, {tests!r})
import test_held_out_set as t
from starcoder2_train.evaluation.fim import evaluate_fim
from starcoder2_train.evaluation.loss import evaluate_loss
from starcoder2_train.training.distributed import close_process_group

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
built = t.build({cache!r}, tokenizer)  # both ranks: one builds under the lock, the other opens
model = t.tiny_model(tokenizer)
loss = evaluate_loss(model, built.loss_rows, seq_length=32, batch_size=3, rank=rank, world_size=world)
fim = evaluate_fim(model, tokenizer, built.fim_problems(), batch_size=2, max_new_tokens=6, max_prompt_tokens=40,
                   rank=rank, world_size=world)
json.dump({{"loss": loss, "fim": fim}}, open({out!r} + str(rank), "w"))
close_process_group(exit_code=0)
"""


def tiny_model(tokenizer):
    torch.manual_seed(0)
    model = create_model(
        ModelArguments(model_config="test", torch_dtype="float32", attn_implementation="eager"), tokenizer=tokenizer
    )
    return model.eval()


@pytest.mark.slow
def test_two_ranks_give_the_figures_of_one(tmp_path, tokenizer, tokenizer_dir):
    """The held-out set split across 2 gloo processes: loss sums and token counts per language and FIM exact-match
    counts reduced equal 1 rank's figures; the set was built once."""
    script = tmp_path / "ranks.py"
    cache, out = tmp_path / "cache", str(tmp_path / "result-")
    script.write_text(
        RANK_SCRIPT.format(tests=str(Path(__file__).parent), tokenizer=tokenizer_dir, cache=str(cache), out=out)
    )
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run([*command, str(script)], env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len([path for path in os.listdir(cache) if not path.endswith(".lock")]) == 1  # one set, no leftovers

    built = build(cache, tokenizer)
    model = tiny_model(tokenizer)
    one = {
        "loss": evaluate_loss(model, built.loss_rows, seq_length=32, batch_size=3),
        "fim": evaluate_fim(
            model, tokenizer, built.fim_problems(), batch_size=2, max_new_tokens=6, max_prompt_tokens=40
        ),
    }
    assert one["loss"]["tokens"] == 1600 - len(built.loss_rows) and one["fim"]["problems"] == 24
    for rank in (0, 1):
        two = json.loads(Path(out + str(rank)).read_text())
        assert two["loss"].keys() == one["loss"].keys() and two["fim"] == one["fim"]
        for key, value in one["loss"].items():
            assert two["loss"][key] == pytest.approx(value, rel=1e-6), key


def test_eval_languages_keeps_the_languages_with_the_most_files(tmp_path, tokenizer):
    counts = Counter(file["language"] for repo in REPOSITORIES for file in repo["files"])
    built = held_out_set.ensure_held_out_set(
        REPOSITORIES, tokenizer, str(tmp_path), seed=1, tokens_per_language=100, fim_problems=8, languages=2
    )
    most = sorted(sorted(counts, key=lambda language: (-counts[language], language))[:2])
    assert built.languages == most
    assert {problem.language for problem in built.fim_problems()} == set(most)


def test_the_trainers_eval_windows_drawn_by_seed():
    from starcoder2_train.evaluation.held_out import drawn_windows

    windows = list(range(100))
    assert drawn_windows(windows, 0, seed=1) is windows and drawn_windows(windows, 100, seed=1) is windows
    drawn = drawn_windows(windows, 10, seed=1)
    assert len(drawn) == 10 and list(drawn) == sorted(drawn) and list(drawn) != list(range(10))
    assert list(drawn) == list(drawn_windows(windows, 10, seed=1)) != list(drawn_windows(windows, 10, seed=2))


@pytest.mark.parametrize("key", ["eval_tokens_per_language", "eval_languages", "eval_loss_windows"])
def test_a_negative_bound_is_refused_by_name(key, tmp_path):
    from starcoder2_train.configs import PretrainingArguments, RecipeError

    with pytest.raises(RecipeError, match=f"^{key}: must be 0"):
        PretrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{key: -1})


@pytest.mark.slow
def test_a_mixture_evaluates_its_first_repository_source(tmp_path, code_shards, tokenizer_dir):
    """run.py: a mixture's held-out set is its first repository source's (data/pipeline.py's evaluation_data_args),
    built under OUTPUT_DIR/held_out, scored during training."""
    from conftest import load_script
    from test_mixture import write_mixture_recipe

    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "issues.jsonl").write_text(
        "".join(json.dumps({"content": f"issue {i}\n" * 9}) + "\n" for i in range(20))
    )
    recipe = write_mixture_recipe(
        tmp_path / "mix.yaml",
        code_shards,
        str(documents),
        tokenizer_dir,
        output_dir=tmp_path / "out",
        max_steps=2,
        eval_fraction=0.2,
        eval_strategy="steps",
        eval_steps=2,
        fim_eval_problems=6,
        eval_tokens_per_language=300,
        save_strategy="'no'",
        use_cpu="true",
        disable_tqdm="true",
    )
    trainer = load_script("run_pretrain").main([str(recipe)])
    (callback,) = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "EvaluationCallback"]
    assert callback.latest_results["fim"]["problems"] == 6 and callback.latest_results["loss"]["tokens"] > 0
    (built,) = (tmp_path / "out" / "held_out").glob("held_out-*[!k]")  # the set, not its lock
    problems = held_out_set.HeldOutSet(str(built)).fim_problems()
    assert all(problem.path.startswith("owner") for problem in problems)  # repositories of code_shards
