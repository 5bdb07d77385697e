"""Bad input on the commands users run (docs/bad_input.md lists each row and its test).

Every bad input ends in one of two ways: an error that names the file, row or key and says what to do, printed
by the command without a traceback (or, where the command is called in-process, a RecipeError with that
message), or a skip counted with its reason in the command's report. Neither changes the data: the good
repositories' tokens and samples are the same with and without the bad input beside them.
"""

import copy
import io
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import LAUNCH_ENV, load_script, random_repositories, write_repository_shards

from starcoder2_train.configs import RecipeError
from starcoder2_train.data.special_tokens import STARCODER2_SPECIAL_TOKENS
from starcoder2_train.data.store.prepared import open_store, prepared_skips, prepared_stats

ROOT = Path(__file__).parents[1]
MAX_FILE_BYTES = 4000
inspect_data, prepare_data, run_pretrain = (
    load_script(name) for name in ("inspect_data", "prepare_data", "run_pretrain")
)


def write_recipe(tmp_path, shards, tokenizer_dir, name="recipe.yaml", **overrides) -> str:
    values = dict(
        model_config="test",
        dataset_name_or_path=shards,
        tokenizer_name_or_path=tokenizer_dir,
        seq_length=64,
        max_file_bytes=MAX_FILE_BYTES,
        num_proc=2,
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        num_train_epochs=1,  # one data epoch: every repository once
    )
    values.update(overrides)
    path = tmp_path / name
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items() if value is not None))
    return str(path)


def run_command(script: str, *args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """scripts/SCRIPT.py as a user runs it, offline unless `env` says otherwise."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args],
        cwd=cwd or ROOT,
        env={**LAUNCH_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_clean_error(process: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> str:
    """Exit status 1 (2 for a mistake on the command line, starcoder2_train/cli.py), one `error: ...` message at the
    end of stderr holding every fragment, no traceback anywhere."""
    output = process.stdout + process.stderr
    assert process.returncode == status, output[-3000:]
    assert "Traceback" not in output and "usage:" not in output, output[-3000:]
    message = process.stderr[process.stderr.rindex("error: ") :]
    assert len(message.strip().splitlines()) <= 4, message  # the message, not a library's 30-line traceback
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------------------------
# Bad data: each kind is written beside good repositories; the skips are counted, the good data is unchanged.

REPO_SCHEMA = pa.schema(
    [
        ("repo_name", pa.string()),
        ("files", pa.list_(pa.struct([("path", pa.string()), ("content", pa.string()), ("language", pa.string())]))),
    ]
)


def python_file(path, content):
    return {"path": path, "content": content, "language": "Python"}


def corrupt_parquet(directory, repositories) -> Counter:
    (directory / "zz-corrupt.parquet").write_bytes(random.Random(0).randbytes(4096))
    return Counter({"parquet files: unreadable parquet file": 1})


def truncated_parquet(directory, repositories) -> Counter:
    others = [dict(r, repo_name=f"truncated/{r['repo_name']}") for r in random_repositories(10, seed=77)]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(others), buffer)
    whole = buffer.getvalue()
    (directory / "zz-truncated.parquet").write_bytes(whole[: len(whole) // 2])
    return Counter({"parquet files: unreadable parquet file": 1})


def non_utf8_and_binary(directory, repositories) -> Counter:
    repositories[0]["files"].append(python_file("nul.py", "x = 1\x00\x00\n"))  # a NUL in a string column
    # Bytes contents (Stack v2's raw blobs), no src_encoding: decoded as UTF-8.
    bytes_schema = pa.schema(
        [("repo_name", pa.string()), ("files", pa.list_(pa.struct([("path", pa.string()), ("content", pa.binary())])))]
    )
    blobs = [
        {"path": "latin1.py", "content": b"caf\xe9 = 1\n"},
        {"path": "logo.py", "content": b"\x89PNG\r\n\x00\x00"},
    ]
    pq.write_table(
        pa.Table.from_pylist([{"repo_name": "bytes/repo", "files": blobs}], schema=bytes_schema),
        directory / "zz-bytes.parquet",
    )
    # A string column holding bytes that are not UTF-8 (a writer that did not validate), beside a good repository:
    # the last good one, moved here (its order among the others is kept), with one such file added.
    moved = repositories.pop()
    moved_files = [(f["path"], f["content"].encode(), f["language"]) for f in moved["files"]]
    rows = [(moved["repo_name"], moved_files + [("bad.py", b"\xff", "Python")])]
    rows.append(("utf8/invalid", [("a.py", b"caf\xe9 = 1\n", "Python")]))
    columns = list(zip(*(file for _, files in rows for file in files)))
    contents = pa.array(columns[1], pa.binary()).view(pa.string())
    files = pa.StructArray.from_arrays(
        [pa.array(columns[0]), contents, pa.array(columns[2])], names=["path", "content", "language"]
    )
    offsets = [0]
    for _, row_files in rows:
        offsets.append(offsets[-1] + len(row_files))
    table = pa.table(
        {
            "repo_name": [name for name, _ in rows],
            "files": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), files),
        }
    )
    pq.write_table(table, directory / "zz-invalid-utf8.parquet")
    return Counter(
        {
            "files: binary content (NUL byte)": 2,  # nul.py, logo.py
            "files: content not decodable as its src_encoding": 3,  # latin1.py, bad.py, a.py
            "repositories: no file left after filtering": 2,  # bytes/repo, utf8/invalid
        }
    )


def empty_repositories_and_files(directory, repositories) -> Counter:
    repositories[1]["files"].append(python_file("empty.py", ""))
    repositories[2]["files"].append(python_file("null.py", None))
    rows = [
        {"repo_name": "empty/no-files", "files": []},
        {"repo_name": "empty/null-files", "files": None},
        {"repo_name": "empty/only-empty", "files": [python_file("a.py", ""), python_file("b.py", "")]},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=REPO_SCHEMA), directory / "zz-empty.parquet")
    return Counter(
        {
            "files: empty content": 3,
            "files: missing content": 1,
            "repositories: no file left after filtering": 3,
        }
    )


def files_above_max_file_bytes(directory, repositories) -> Counter:
    # 2,001 characters but 4,002 bytes of UTF-8: the limit is in bytes.
    repositories[3]["files"].append(python_file("big.py", "é" * (MAX_FILE_BYTES // 2 + 1)))
    rows = [{"repo_name": "large/only", "files": [python_file("huge.py", "x" * (MAX_FILE_BYTES + 1))]}]
    pq.write_table(pa.Table.from_pylist(rows, schema=REPO_SCHEMA), directory / "zz-large.parquet")
    return Counter({"files: larger than max_file_bytes": 2, "repositories: no file left after filtering": 1})


BAD_DATA = {
    "corrupt_parquet": corrupt_parquet,
    "truncated_parquet": truncated_parquet,
    "non_utf8_and_binary": non_utf8_and_binary,
    "empty_repositories_and_files": empty_repositories_and_files,
    "files_above_max_file_bytes": files_above_max_file_bytes,
}


def good_repositories() -> list[dict]:
    return random_repositories(30, seed=21)


def write_bad_data(directory: Path, kinds) -> Counter:
    """The good repositories, bad files added to some of them, and the bad kinds' own parquet files after them."""
    directory.mkdir(parents=True)
    repositories, expected = copy.deepcopy(good_repositories()), Counter()
    for kind in kinds:
        expected += BAD_DATA[kind](directory, repositories)
    write_repository_shards(directory, repositories)  # train-*.parquet: read before the zz-*.parquet files
    return expected


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tokenizer_dir):
    """inspect_data on the good repositories alone: its report and every sample it writes."""
    root = tmp_path_factory.mktemp("baseline")
    shards = write_repository_shards(root / "shards", good_repositories())
    recipe = write_recipe(root, shards, tokenizer_dir)
    report = inspect_data.main([recipe, "--num_samples", "100000", "--output", str(root / "s")])
    assert report.skipped == {} and report.repositories == 30
    return report, (root / "s").read_text(), recipe


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_inspect_data_counts_bad_data_and_leaves_the_good_data_unchanged(
    kind, baseline, tokenizer_dir, tmp_path, caplog
):
    expected = write_bad_data(tmp_path / "shards", [kind])
    samples = tmp_path / "samples.jsonl"
    path = write_recipe(tmp_path, str(tmp_path / "shards"), tokenizer_dir)
    report = inspect_data.main([path, "--num_samples", "100000", "--output", str(samples)])
    assert report.skipped == dict(expected)
    good, good_samples, _ = baseline
    assert (report.repositories, report.files, report.tokens) == (good.repositories, good.files, good.tokens)
    assert samples.read_text() == good_samples  # every window, token for token
    if "parquet" in kind:  # the warning names the file it left out
        assert f"Skipping {tmp_path / 'shards'}/zz-" in caplog.text and "not a readable parquet file" in caplog.text


@pytest.mark.slow
def test_prepare_data_counts_every_kind_of_bad_data_and_writes_the_same_tokens(baseline, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from starcoder2_train.data.pipeline import load_token_rows
    from starcoder2_train.recipe import RecipeParser

    expected = write_bad_data(tmp_path / "shards", list(BAD_DATA))
    path = write_recipe(tmp_path, str(tmp_path / "shards"), tokenizer_dir)
    output = tmp_path / "prepared"
    prepare_data.main([path, "--output", str(output), "--tasks", "2", "--workers", "2"])
    assert prepared_skips(str(output)).as_dict() == dict(expected)
    stats, (good, _, good_recipe) = prepared_stats(str(output)), baseline
    assert (stats["train repositories"], stats["train files"]) == (good.repositories, good.files)
    assert stats["train tokens"] == good.tokens
    # The store holds exactly the examples the good repositories alone make, in their order, token for token.
    _, data_args, training_args = RecipeParser().parse([good_recipe])
    rows, _ = load_token_rows(data_args, AutoTokenizer.from_pretrained(tokenizer_dir), training_args.seed)
    store = open_store(str(output), "train", 0)
    assert [store.example(i).tolist() for i in range(store.num_examples)] == [list(ids) for ids in rows["input_ids"]]


# ---------------------------------------------------------------------------------------------------------------
# Shards of the wrong schema: refused before any work, naming the file, the column and what to do.

WRONG_SCHEMAS = {
    "missing_content": (
        pa.Table.from_pylist([{"repo_name": "a/b", "files": [{"path": "x.py", "text": "x = 1\n"}]}]),
        "missing column(s) files.content. Accepted layouts: one row per repository",
    ),
    "missing_files": (
        pa.Table.from_pylist([{"repo_name": "a/b", "blobs": [{"path": "x.py", "content": "x = 1\n"}]}]),
        "missing column(s) path, content. Accepted layouts",
    ),
    "content_not_text": (
        pa.Table.from_pylist([{"repo_name": "a/b", "files": [{"path": "x.py", "content": 12345}]}]),
        "column files.content is int64, not a string or bytes; rewrite the shard",
    ),
    "files_not_a_list": (
        pa.Table.from_pylist([{"repo_name": "a/b", "files": "x.py"}]),
        "column files is string, not a list of structs with path and content",
    ),
    "repo_name_not_text": (
        pa.Table.from_pylist([{"repo_name": 7, "files": [{"path": "x.py", "content": "x = 1\n"}]}]),
        "column repo_name is int64, not a string; rewrite the shard",
    ),
}


def wrong_schema_shards(directory: Path, kind: str) -> tuple[str, str]:
    shards = write_repository_shards(directory, good_repositories())
    table, message = WRONG_SCHEMAS[kind]
    pq.write_table(table, directory / "zz-wrong.parquet")
    return shards, f"{directory / 'zz-wrong.parquet'}: {message}"


@pytest.mark.parametrize("kind", list(WRONG_SCHEMAS))
def test_a_shard_of_the_wrong_schema_is_refused_naming_file_and_column(kind, tokenizer_dir, tmp_path):
    shards, message = wrong_schema_shards(tmp_path / "shards", kind)
    path = write_recipe(tmp_path, shards, tokenizer_dir)
    with pytest.raises(RecipeError) as raised:
        inspect_data.main([path, "--output", str(tmp_path / "s")])
    assert message in str(raised.value)
    with pytest.raises(RecipeError) as raised:
        prepare_data.main([path, "--output", str(tmp_path / "p"), "--tasks", "2", "--workers", "2"])
    assert message in str(raised.value)
    assert not (tmp_path / "p" / "train").exists()  # refused before any task ran


# ---------------------------------------------------------------------------------------------------------------
# Bad recipes, tokenizers and ids: errors naming the key.


def test_a_wrong_type_names_the_key_and_where_it_was_written(code_shards, tokenizer_dir, tmp_path, capsys):
    path = write_recipe(tmp_path, code_shards, tokenizer_dir, seq_length="long")
    with pytest.raises(RecipeError, match=rf"seq_length: invalid int value: 'long' \(in recipe {path}\)"):
        inspect_data.main([path, "--output", str(tmp_path / "s")])
    good = write_recipe(tmp_path, code_shards, tokenizer_dir, name="good.yaml")
    with pytest.raises(RecipeError, match=r"fim_rate: invalid float value: 'x' \(in the command line\)"):
        prepare_data.main([good, "--output", str(tmp_path / "p"), "--fim_rate", "x"])
    with pytest.raises(RecipeError, match=r"use_cpu: Truthy value expected"):
        run_pretrain.main([good, "--use_cpu", "maybe"])
    assert "usage:" not in capsys.readouterr().err  # not the usage of every key
    assert not (tmp_path / "out").exists()


def plain_tokenizer(directory: Path, specials: list[str], vocab_size: int) -> str:
    """A byte-level BPE with `vocab_size` ordinary tokens first and `specials` after them (ids vocab_size, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [file["content"] for repository in random_repositories(200, seed=3) for file in repository["files"]]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(directory)
    return str(directory)


def test_a_tokenizer_without_fim_tokens_is_refused_by_inspect_and_prepare(code_shards, tmp_path):
    tokenizer = plain_tokenizer(tmp_path / "nofim", ["<|endoftext|>", "<file_sep>"], 400)
    path = write_recipe(tmp_path, code_shards, tokenizer)
    message = rf"tokenizer_name_or_path: '{tokenizer}' lacks the special token\(s\) <fim_prefix>"
    with pytest.raises(RecipeError, match=message):
        inspect_data.main([path, "--output", str(tmp_path / "s")])
    with pytest.raises(RecipeError, match=message):
        prepare_data.main([path, "--output", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """A saved test-preset model for tokenizer_dir (600 tokens: 640 embedding rows), and that directory."""
    from transformers import AutoTokenizer

    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.model.factory import create_model

    directory = tmp_path_factory.mktemp("checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    create_model(ModelArguments(model_config="test"), tokenizer=tokenizer, attn_implementation="sdpa").save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_a_tokenizer_of_another_vocabulary_than_the_checkpoint_is_refused(checkpoint, code_shards, tmp_path):
    # 700 ordinary tokens, then the structure tokens at ids 700+: beyond the checkpoint's 640 rows.
    tokenizer = plain_tokenizer(tmp_path / "other", STARCODER2_SPECIAL_TOKENS, 700)
    path = write_recipe(tmp_path, code_shards, tokenizer, model_config=None, model_name_or_path=checkpoint)
    with pytest.raises(RecipeError, match=r"tokenizer_name_or_path: the structure token id\(s\) \[7\d\d, .*\] lie "
                       r"beyond the checkpoint's vocab_size 640 .* Leave tokenizer_name_or_path unset"):  # fmt: skip
        run_pretrain.main([path, "--max_steps", "1"])
    assert not (tmp_path / "out").exists()


OFFLINE = "HF_HUB_OFFLINE is set, so the Hub id nobody-xyz-0/no-such-{} was looked up in the local cache only"


def test_offline_hub_ids_say_offline_and_what_to_do(checkpoint, code_shards, tokenizer_dir, tmp_path):
    missing = "nobody-xyz-0/no-such-{}"
    path = write_recipe(tmp_path, code_shards, tokenizer_dir)
    with pytest.raises(RecipeError) as raised:
        inspect_data.main([path, "--dataset_name_or_path", missing.format("dataset"), "--output", str(tmp_path / "s")])
    assert str(raised.value).startswith("dataset_name_or_path: nobody-xyz-0/no-such-dataset is not a local directory")
    assert OFFLINE.format("dataset") in str(raised.value) and "unset HF_HUB_OFFLINE" in str(raised.value)
    with pytest.raises(RecipeError) as raised:
        prepare_data.main(
            [path, "--tokenizer_name_or_path", missing.format("tokenizer"), "--output", str(tmp_path / "p")]
        )
    assert str(raised.value).startswith("tokenizer_name_or_path: could not load a tokenizer from 'nobody-xyz-0/")
    assert OFFLINE.format("tokenizer") in str(raised.value)
    model = write_recipe(
        tmp_path,
        code_shards,
        tokenizer_dir,
        "model.yaml",
        model_config=None,
        model_name_or_path=missing.format("model"),
    )
    with pytest.raises(RecipeError) as raised:
        run_pretrain.main([model])
    assert str(raised.value).startswith("model_name_or_path: could not load a model config from 'nobody-xyz-0/")
    assert OFFLINE.format("model") in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hub_without_repositories():
    """A local stand-in for the Hub API that answers every request as a repository that does not exist."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def answer(self):
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            for key, value in (("X-Error-Code", "RepositoryNotFound"), ("X-Error-Message", "Repository not found")):
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_hub_ids_that_do_not_exist_say_so_and_what_to_do(
    hub_without_repositories, code_shards, tokenizer_dir, tmp_path
):
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub_without_repositories, "HF_HOME": str(tmp_path / "hf")}
    path = write_recipe(tmp_path, code_shards, tokenizer_dir)
    for key, kind in (("tokenizer_name_or_path", "tokenizer"), ("dataset_name_or_path", "dataset")):
        process = run_command("inspect_data", path, f"--{key}", f"nobody-xyz-0/no-such-{kind}", env=env)
        assert_clean_error(
            process, f"error: {key}: ", f"check that the Hub id nobody-xyz-0/no-such-{kind} exists", "HF_TOKEN"
        )
    # run_pretrain.py prints a RecipeError with a traceback today (docs/bad_input.md): its message is checked here.
    model = write_recipe(
        tmp_path,
        code_shards,
        tokenizer_dir,
        "model.yaml",
        model_config=None,
        model_name_or_path="nobody-xyz-0/no-such-model",
    )
    driver = (
        "import sys; sys.path.insert(0, 'tests'); from conftest import load_script\n"
        "from starcoder2_train.configs import RecipeError\n"
        f"try: load_script('run_pretrain').main([{model!r}])\n"
        "except RecipeError as error: sys.exit(f'RecipeError: {error}')\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", driver],
        cwd=ROOT,
        env={**LAUNCH_ENV, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (
        process.returncode == 1 and "RecipeError: model_name_or_path: could not load a model config" in process.stderr
    )
    assert "check that the Hub id nobody-xyz-0/no-such-model exists" in process.stderr


# ---------------------------------------------------------------------------------------------------------------
# The commands print errors as one message, without a traceback.


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,case",
    [
        ("inspect_data", "unknown_key"),
        ("inspect_data", "wrong_type"),
        ("inspect_data", "offline_dataset"),
        ("inspect_data", "missing_content"),
        ("prepare_data", "content_not_text"),
        ("prepare_data", "offline_tokenizer"),
        ("run_pretrain", "unknown_key"),
    ],
)
def test_commands_print_errors_without_a_traceback(script, case, code_shards, tokenizer_dir, tmp_path):
    shards, words, expected = code_shards, [], ""
    if case in WRONG_SCHEMAS:
        shards, expected = wrong_schema_shards(tmp_path / "shards", case)
    path = write_recipe(tmp_path, shards, tokenizer_dir)
    if case == "unknown_key":
        words, expected = (
            ["--seq_lenght", "64"],
            "unknown key 'seq_lenght' in the command line. Did you mean 'seq_length'?",
        )
    elif case == "wrong_type":
        words, expected = ["--seq_length", "long"], "seq_length: invalid int value: 'long' (in the command line)"
    elif case == "offline_dataset":
        words, expected = ["--dataset_name_or_path", "nobody-xyz-0/no-such-dataset"], OFFLINE.format("dataset")
    elif case == "offline_tokenizer":
        words, expected = ["--tokenizer_name_or_path", "nobody-xyz-0/no-such-tokenizer"], OFFLINE.format("tokenizer")
    own = {
        "inspect_data": ["--output", str(tmp_path / "s")],
        "prepare_data": ["--output", str(tmp_path / "p"), "--tasks", "2", "--workers", "2"],
    }
    process = run_command(script, path, *words, *own.get(script, []), cwd=tmp_path)
    message = assert_clean_error(process, expected, status=2 if case in ("unknown_key", "wrong_type") else 1)
    if case in ("unknown_key", "wrong_type"):  # written on the command line: a usage error, with the hint
        assert message.rstrip().endswith(f"(see {script}.py --help)"), message


# ---------------------------------------------------------------------------------------------------------------
# Safety: no remote code unless the recipe says so; no credential written by a run.


@pytest.mark.slow
def test_remote_code_is_off_unless_the_recipe_says_so(checkpoint, code_shards, tokenizer_dir, tmp_path, monkeypatch):
    import transformers

    from starcoder2_train.recipe import RecipeParser

    path = write_recipe(tmp_path, code_shards, tokenizer_dir, model_config=None, model_name_or_path=checkpoint)
    model_args, _, _ = RecipeParser().parse([path])
    assert model_args.trust_remote_code is False
    calls = []

    def spy(cls, method):
        original = getattr(cls, method)

        def recorded(*args, **kwargs):
            calls.append((cls.__name__, method, kwargs.get("trust_remote_code")))
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, method, recorded)

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        spy(cls, "from_pretrained")
    spy(transformers.AutoModelForCausalLM, "from_config")
    run_pretrain.main([path, "--max_steps", "1", "--save_strategy", "no", "--attn_implementation", "sdpa"])
    loaded = {(name, method) for name, method, _ in calls}
    assert {("AutoConfig", "from_pretrained"), ("AutoModelForCausalLM", "from_pretrained")} <= loaded
    assert ("AutoTokenizer", "from_pretrained") in loaded
    assert all(trust is False for _, _, trust in calls), calls
    calls.clear()
    model_args, _, _ = RecipeParser().parse([path, "--trust_remote_code", "true"])
    assert model_args.trust_remote_code is True  # the recipe says so: passed on to the config and the model
    from starcoder2_train.model.presets import build_config

    build_config(model_args, 600)
    assert calls == [("AutoConfig", "from_pretrained", True)]


SECRETS = ("hf_FAKE_SECRET_123", "FAKE_AWS_SECRET")


def files_holding(root: Path, secrets) -> list[str]:
    """Every file under root whose bytes hold one of `secrets` (UTF-8 or UTF-16), binary files included."""
    needles = [secret.encode(encoding) for secret in secrets for encoding in ("utf-8", "utf-16-le")]
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {needle!r}" for needle in needles if needle in data]
    return found


@pytest.mark.slow
def test_a_run_writes_no_token_or_credential(code_shards, tokenizer_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = write_recipe(
        tmp_path,
        code_shards,
        tokenizer_dir,
        output_dir=str(work / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        report_to="tensorboard",
        eval_fraction=0.2,
        eval_strategy="steps",
        eval_steps=2,
        fim_eval_problems=2,
        push_to_hub=True,
        hub_model_id="me/tiny-starcoder2",
        hub_dry_run_dir=str(work / "out" / "upload"),
        attn_implementation="sdpa",
        disable_tqdm=True,
    )
    env = {"HF_TOKEN": SECRETS[0], "AWS_SECRET_ACCESS_KEY": SECRETS[1], "HF_HOME": str(work / "hf")}
    process = run_command("run_pretrain", path, cwd=work, env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    written = [p for p in (work / "out").rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"model.safetensors", "trainer_state.json", "training_args.bin", "README.md"} <= names, names
    assert any(p.name.startswith("events.out.tfevents") for p in written) and (work / "out" / "upload").is_dir()
    assert any("checkpoint-" in str(p) for p in written)
    assert files_holding(work, SECRETS) == []  # output_dir, the caches (HF_HOME) and anything else the run wrote
    assert not any(secret in process.stdout + process.stderr for secret in SECRETS)
    # The check can fail: a secret planted inside a binary file is found.
    planted = work / "out" / "checkpoint-1" / "planted.bin"
    planted.write_bytes(os.urandom(256) + SECRETS[0].encode("utf-16-le") + os.urandom(256))
    assert files_holding(work, SECRETS) == [f"out/checkpoint-1/planted.bin: {SECRETS[0].encode('utf-16-le')!r}"]
