"""Source text can never become a control token, on the path users run: the real scripts, num_proc 1 and 2.

The files below hold the literal text of every StarCoder2 special token (in code, in paths and repository
names); the tokenizer is trained on them by scripts/train_tokenizer.py. `datasets.map` pickles the function it
runs, which once silently turned special-token parsing back on (tokenizers forgets the flag when pickled).
"""

import json
import os

import pytest
from conftest import load_script, write_repository_shards

from starcoder2_train.data.special_tokens import (
    EOS_TOKEN,
    FILE_SEP,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    REPO_NAME,
    STARCODER2_SPECIAL_TOKENS,
)
from starcoder2_train.data.store.prepared import open_store, prepared_stats

LITERALS = "".join(f"s = '{token}'\n{token}not a separator {token}{token}\n" for token in STARCODER2_SPECIAL_TOKENS)


def hostile_repositories(count: int = 24) -> list[dict]:
    repositories = []
    for index in range(count):
        files = [
            {"path": f"src/{FILE_SEP}{index}.py", "content": f"# file {index}\n{LITERALS}x = {index}\n"},
            {"path": "README.md", "content": f"{EOS_TOKEN}\n{REPO_NAME}owner/other\n" * (1 + index % 3)},
            {"path": f"{FIM_MIDDLE}/a.py", "content": f"def f():\n    return '{FIM_PREFIX}{index}'\n"},
        ]
        repositories.append({"repo_name": f"{EOS_TOKEN}owner/{REPO_NAME}repo-{index}", "files": files})
    return repositories


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(shards, tokenizer directory, repositories): a tokenizer trained on the hostile files by the real script."""
    root = tmp_path_factory.mktemp("hostile")
    repositories = hostile_repositories()
    for repository in repositories:
        for file in repository["files"]:
            file["language"] = "Python" if file["path"].endswith(".py") else "Markdown"
    shards = write_repository_shards(root / "shards", repositories)
    load_script("train_tokenizer").main(["--data", shards, "--vocab_size", "700", "--output", str(root / "tok")])
    return shards, str(root / "tok"), repositories


def recipe(tmp_path, shards, tokenizer_dir, num_proc: int, **values) -> str:
    values = dict(
        model_config="test",
        dataset_name_or_path=shards,
        tokenizer_name_or_path=tokenizer_dir,
        seq_length=128,
        num_proc=num_proc,
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        num_train_epochs=1,  # one data epoch: every repository once
        **values,
    )
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    return str(path)


def split_on(ids: list[int], special: set[int]) -> list:
    """ids → [special id or list of text ids, ...], consecutive text ids grouped."""
    parts = []
    for token in ids:
        if token in special:
            parts.append(token)
        elif parts and isinstance(parts[-1], list):
            parts[-1].append(token)
        else:
            parts.append([token])
    return parts


def decode_example(ids: list[int], tokenizer) -> tuple[str | None, list[str]]:
    """(repository name or None, every file's text, header included): the example read back from its ids.

    Only structure tokens delimit anything here, so a single injected id breaks the reconstruction."""
    vocab = tokenizer.get_vocab()
    special = {vocab[token] for token in STARCODER2_SPECIAL_TOKENS}
    eos, file_sep, repo_name = vocab[EOS_TOKEN], vocab[FILE_SEP], vocab[REPO_NAME]
    prefix, middle, suffix = vocab[FIM_PREFIX], vocab[FIM_MIDDLE], vocab[FIM_SUFFIX]
    text = lambda part: tokenizer.decode(part) if isinstance(part, list) else None  # noqa: E731
    parts = split_on(ids, special)
    assert parts[-1] == eos and eos not in parts[:-1], "exactly one <|endoftext|>, at the end"
    parts, name = parts[:-1], None
    if parts[0] == repo_name:
        name, parts = text(parts[1]), parts[2:]
    files, chunks, current = [], [], None
    for part in parts:
        if part == file_sep:
            current = []
            chunks.append(current)
        else:
            current.append(part)
    for chunk in chunks:
        joined = lambda part: "".join(text(p) for p in part)  # noqa: E731
        markers = [p for p in chunk if not isinstance(p, list)]
        if not markers:
            files.append(joined(chunk))
            continue
        # PSM <fim_prefix>a<fim_suffix>b<fim_middle>c and SPM <fim_prefix><fim_suffix>b<fim_middle>c (a empty): a+c+b
        assert markers == [prefix, suffix, middle] and chunk[0] == prefix, markers
        at_suffix, at_middle = chunk.index(suffix), chunk.index(middle)
        files.append(
            joined(chunk[1:at_suffix]) + joined(chunk[at_middle + 1 :]) + joined(chunk[at_suffix + 1 : at_middle])
        )
    return name, files


@pytest.mark.parametrize("num_proc", [1, 2])
def test_prepare_data_rows_decode_back_to_the_files(hostile, tmp_path, num_proc):
    from transformers import AutoTokenizer

    shards, tokenizer_dir, repositories = hostile
    path = recipe(tmp_path, shards, tokenizer_dir, num_proc, fim_rate=1.0, fim_fragment_rate=0.7)
    # datatrove's tasks in as many worker processes (the pipeline steps are pickled to them)
    load_script("prepare_data").main(
        [path, "--output", str(tmp_path / "prepared"), "--tasks", str(num_proc), "--workers", str(num_proc)]
    )
    store = open_store(str(tmp_path / "prepared"), "train", 0)
    rows = [store.example(index).tolist() for index in range(store.num_examples)]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    by_name = {repository["repo_name"]: repository for repository in repositories}
    stats = prepared_stats(str(tmp_path / "prepared"))
    assert len(rows) == len(repositories) and stats["train files FIM PSM"] > 0 and stats["train files FIM SPM"] > 0
    names = iter(by_name)  # the input's order: a store keeps it
    for ids in rows:
        name, files = decode_example(ids, tokenizer)
        repo_name = next(names)
        original = by_name[repo_name]["files"]
        if name is not None:  # with metadata: the name, and each file behind its path
            assert name == repo_name
            expected = sorted(f"{file['path']}\n{file['content']}" for file in original)
        else:
            expected = sorted(file["content"] for file in original)
        assert sorted(files) == expected


@pytest.mark.parametrize("num_proc", [1, 2])
def test_inspect_data_samples_hold_only_the_structure_tokens(hostile, tmp_path, num_proc):
    from transformers import AutoTokenizer

    shards, tokenizer_dir, repositories = hostile
    path = recipe(tmp_path, shards, tokenizer_dir, num_proc, fim_rate=0.0, repo_metadata_rate=0.0)
    out = tmp_path / "samples.jsonl"
    load_script("inspect_data").main([path, "--num_samples", "100000", "--output", str(out)])
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    vocab = AutoTokenizer.from_pretrained(tokenizer_dir).get_vocab()
    ids = [token for sample in samples for token in sample["input_ids"]]
    counts = {token: ids.count(vocab[token]) for token in STARCODER2_SPECIAL_TOKENS}
    trained_eos = sum(
        token == vocab[EOS_TOKEN] and label != -100
        for sample in samples
        for token, label in zip(sample["input_ids"], sample["labels"])
    )  # padding is <|endoftext|> with label -100, at the end of the last window only
    assert trained_eos == len(repositories)
    assert counts[FILE_SEP] == sum(len(repository["files"]) for repository in repositories)
    assert all(count == 0 for token, count in counts.items() if token not in (FILE_SEP, EOS_TOKEN)), counts


def test_a_copied_piece_tokenizer_still_splits_special_token_text(hostile):
    import copy
    import pickle

    import dill
    from transformers import AutoTokenizer

    from starcoder2_train.data.tokens.tokenization import PieceTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hostile[1])
    special = set(PieceTokenizer(tokenizer).token_ids.values())
    pieces = PieceTokenizer(tokenizer)
    for copied in (pickle.loads(pickle.dumps(pieces)), dill.loads(dill.dumps(pieces)), copy.deepcopy(pieces)):
        ids = copied.encode_texts([LITERALS])[0]
        assert not special & set(ids) and tokenizer.decode(ids) == LITERALS
    copied.backend.encode_special_tokens = False  # as a stray copy of the backend would be
    with pytest.raises(RuntimeError, match="special-token parsing is on"):
        copied.encode_texts(["x"])
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
