"""Opt-outs and near-deduplication: an opted-out repository never reaches the tokens; near-copies of a file across
repositories are kept once with MinHash on; both paths (in process, prepare_data.py's tasks) agree."""

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_script, write_repository_shards
from test_bad_input import assert_clean_error, run_command, write_recipe

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.filters.opt_outs import load_opt_outs
from starcoder2_train.data.pipeline import load_token_rows
from starcoder2_train.data.sources.shards import load_repositories
from starcoder2_train.data.store.prepared import open_store, prepared_skips

prepare_data = load_script("prepare_data")
OPTED_OUT = "repositories: opted-out repository (exclude_repositories)"
NEAR_DUPLICATE = "files: near-duplicate of a file kept elsewhere (near_dedup, MinHash)"
NO_FILE_LEFT = "repositories: no file left after filtering"
MARKER = "opted_out_marker_4711"


def unique_code(rng: random.Random, lines: int = 40) -> str:
    """Code no other file resembles: random names, so that only planted copies are near-duplicates."""

    def word():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))

    return "".join(
        f"{word()} = {word()}({word()}, {rng.randint(0, 999)})  # {word()} {word()}\n" for _ in range(lines)
    )


def repositories_with_copies() -> tuple[list[dict], str]:
    rng = random.Random(5)
    repositories = [
        {
            "repo_name": f"owner{r}/project-{r}",
            "files": [{"path": f"src/m{f}.py", "content": unique_code(rng), "language": "Python"} for f in range(2)],
        }
        for r in range(10)
    ]
    original = unique_code(rng, lines=60)
    lines = original.splitlines(keepends=True)
    near_copy = "".join(["    " + line for line in lines[:30]] + ["extra = 1\n"] + lines[31:])  # re-indented, edited
    repositories[2]["files"].append({"path": "util.py", "content": original, "language": "Python"})
    repositories[6]["files"].append({"path": "vendored/util.py", "content": near_copy, "language": "Python"})
    repositories.append(
        {"repo_name": "mirror/only-a-copy", "files": [{"path": "u.py", "content": original, "language": "Python"}]}
    )
    secret = {
        "path": "secret.py",
        "content": f"{MARKER} = 'do not train on me'\n" + unique_code(rng),
        "language": "Python",
    }
    repositories.insert(4, {"repo_name": "Secret-Owner/Private-Repo", "files": [secret]})
    return repositories, original


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    repositories, _ = repositories_with_copies()
    opt_outs = root / "opt-outs.txt"
    opt_outs.write_text("# repositories whose owners opted out\n\nhttps://github.com/secret-owner/private-repo.git\n")
    return write_repository_shards(root / "shards", repositories, num_files=3), str(opt_outs)


def files_of(rows) -> dict:
    return {name: n for name, n in zip(rows["repo_name"], rows["num_files"])}


def test_an_opted_out_repository_never_reaches_the_tokens(shards, tokenizer, tokenizer_dir, tmp_path):
    directory, opt_outs = shards
    args = DataArguments(
        dataset_name_or_path=directory, tokenizer_name_or_path=tokenizer_dir, exclude_repositories=opt_outs
    )
    rows, skips = load_token_rows(args, tokenizer, seed=1)
    assert skips.as_dict() == {OPTED_OUT: 1}  # the repository, once; none of its files under another reason
    assert "Secret-Owner/Private-Repo" not in list(rows["repo_name"]) and len(rows) == 11
    assert MARKER not in tokenizer.decode(np.concatenate(rows["input_ids"]).tolist())
    everything, _ = load_token_rows(
        DataArguments(dataset_name_or_path=directory, tokenizer_name_or_path=tokenizer_dir), tokenizer, 1
    )
    assert MARKER in tokenizer.decode(np.concatenate(everything["input_ids"]).tolist())  # the test can see it
    # prepare_data.py's tasks: the same count, the same tokens.
    recipe = write_recipe(tmp_path, directory, tokenizer_dir, exclude_repositories=opt_outs, num_train_epochs=None)
    prepare_data.main([recipe, "--output", str(tmp_path / "p"), "--tasks", "2", "--workers", "1"])
    assert prepared_skips(str(tmp_path / "p")).as_dict() == {OPTED_OUT: 1}
    store = open_store(str(tmp_path / "p"), "train", 0)
    stored = [store.example(i).tolist() for i in range(store.num_examples)]
    assert stored == [list(ids) for ids in load_token_rows(args, tokenizer, seed=42)[0]["input_ids"]]
    assert MARKER not in tokenizer.decode(np.concatenate([np.asarray(ids) for ids in stored]).tolist())


def test_an_opted_out_repository_of_per_file_shards_is_counted_once(tmp_path):
    rows = [
        {"repo_name": "keep/me", "path": "a.py", "content": "x = 1\n"},
        {"repo_name": "gone/repo", "path": "b.py", "content": "y = 2\n"},
        {"repo_name": "gone/repo", "path": "c.py", "content": ""},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "files.parquet")
    (tmp_path / "opt-outs.txt").write_text("Gone/Repo\n")
    args = DataArguments(
        dataset_name_or_path=str(tmp_path / "files.parquet"), exclude_repositories=str(tmp_path / "opt-outs.txt")
    )
    repositories, skips = load_repositories(args)
    assert list(repositories["repo_name"]) == ["keep/me"] and skips.as_dict() == {OPTED_OUT: 1}


def test_near_identical_files_across_repositories_become_one(shards, tokenizer, tokenizer_dir, tmp_path):
    directory, _ = shards
    on = DataArguments(dataset_name_or_path=directory, tokenizer_name_or_path=tokenizer_dir, near_dedup=True)
    off = DataArguments(dataset_name_or_path=directory, tokenizer_name_or_path=tokenizer_dir)
    deduplicated, skips = load_token_rows(on, tokenizer, seed=3)
    everything, _ = load_token_rows(off, tokenizer, seed=3)
    # The first copy in input order (owner2's) is kept; owner6's near-copy and the mirror's exact copy are not.
    assert skips.as_dict() == {NEAR_DUPLICATE: 2, NO_FILE_LEFT: 1}
    before, after = files_of(everything), files_of(deduplicated)
    assert before["owner6/project-6"] == 3 and after["owner6/project-6"] == 2 and after["owner2/project-2"] == 3
    assert "mirror/only-a-copy" in before and "mirror/only-a-copy" not in after
    assert sum(after.values()) == sum(before.values()) - 2
    assert deduplicated._fingerprint != everything._fingerprint
    stricter = DataArguments(
        dataset_name_or_path=directory, tokenizer_name_or_path=tokenizer_dir, near_dedup=True, near_dedup_buckets=20
    )
    assert load_token_rows(stricter, tokenizer, seed=3)[0]._fingerprint != deduplicated._fingerprint


def test_prepare_data_removes_the_near_copies_the_in_process_path_removes(shards, tokenizer, tokenizer_dir, tmp_path):
    directory, _ = shards
    recipe = write_recipe(tmp_path, directory, tokenizer_dir, near_dedup=True, num_train_epochs=None)
    stores = {}
    for tasks in ("1", "3"):
        output = tmp_path / f"tasks-{tasks}"
        prepare_data.main([recipe, "--output", str(output), "--tasks", tasks, "--workers", "2"])
        assert prepared_skips(str(output)).as_dict() == {NEAR_DUPLICATE: 2, NO_FILE_LEFT: 1}
        store = open_store(str(output), "train", 0)
        stores[tasks] = [store.example(i).tolist() for i in range(store.num_examples)]
    args = DataArguments(
        dataset_name_or_path=directory, tokenizer_name_or_path=tokenizer_dir, near_dedup=True, num_proc=2
    )
    rows, _ = load_token_rows(args, tokenizer, seed=42)
    assert stores["1"] == stores["3"] == [list(ids) for ids in rows["input_ids"]]


def test_bad_opt_out_lists_are_refused_naming_the_key(shards, tokenizer_dir, tmp_path):
    directory, _ = shards
    missing = tmp_path / "missing.txt"
    recipe = write_recipe(tmp_path, directory, tokenizer_dir, exclude_repositories=str(missing))
    process = run_command("inspect_data", recipe, "--output", str(tmp_path / "s.jsonl"))
    assert_clean_error(process, f"exclude_repositories: {missing}: no such file; give a file of owner/name lines")
    bad = tmp_path / "bad.txt"
    bad.write_text("owner/name\nnot a repository\n")
    with pytest.raises(RecipeError, match=r"bad.txt line 2: 'not a repository' is not a repository name"):
        load_opt_outs(str(bad))
    with pytest.raises(RecipeError, match="exclude_repositories: nobody/no-such-opt-outs .*HF_HUB_OFFLINE is set"):
        load_opt_outs("nobody/no-such-opt-outs")
    with pytest.raises(RecipeError, match="near_dedup: every task's MinHash signatures must exist"):
        prepare_data.main(
            [write_recipe(tmp_path, directory, tokenizer_dir, near_dedup=True), "--output", str(tmp_path / "p")]
            + ["--tasks", "2", "--num_shards", "2", "--shard_index", "0"]
        )
