import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_script
from tokenizers import pre_tokenizers, trainers
from transformers import AutoTokenizer

from starcoder2_train.configs import RecipeError
from starcoder2_train.data.special_tokens import STARCODER2_SPECIAL_TOKENS
from starcoder2_train.data.tokens.tokenizer import (
    iter_parquet_contents,
    learned_special_tokens,
    load_tokenizer,
    new_bpe_tokenizer,
    train_tokenizer,
    train_tokenizer_from_parquet,
)

SPECIAL_IDS = set(range(len(STARCODER2_SPECIAL_TOKENS)))


def make_code(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    syllables = ["val", "tot", "in", "dex", "item", "res", "ult", "con", "fig", "buf", "fer", "pars", "er", "load"]
    names = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
    files = []
    for _ in range(count):
        lines = [f"import {rng.choice(names)}\n"]
        for _ in range(rng.randint(3, 12)):
            name = rng.choice(names)
            lines.append(
                f"def get_{name}_{rng.randint(0, 99)}(self, {rng.choice(names)}):\n"
                f"    return self.{name} + {rng.randint(0, 10_000)}\n\n"
            )
        files.append("".join(lines))
    return files


def write_repo_shard(path, files, repos=4):
    rows = [
        {
            "repo_name": f"org/repo{r}",
            "files": [{"path": f"f{i}.py", "content": text} for i, text in enumerate(files) if i % repos == r],
        }
        for r in range(repos)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_script_trains_a_tokenizer_that_autotokenizer_loads(tmp_path):

    data = tmp_path / "data" / "Python"
    data.mkdir(parents=True)
    files = make_code(0, 200)
    write_repo_shard(data / "train-00000-of-00001.parquet", files)
    script = load_script("train_tokenizer")
    counts = script.main(["--data", str(tmp_path / "data"), "--vocab_size", "600", "--output", str(tmp_path / "tok")])
    assert counts["files"] == 200 and counts["bytes"] == sum(len(t.encode()) for t in files)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tokenizer) == 600
    for index, token in enumerate(STARCODER2_SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == index
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token is None
    assert tokenizer.model_max_length == 16384
    text = "def f(x):\n    return  x , 2024 # tab\there\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: exact round trip, no cleanup of spaces
    assert not SPECIAL_IDS & set(ids)  # nothing added around the text
    digits = tokenizer.convert_ids_to_tokens(tokenizer("x = 2024")["input_ids"])
    assert digits[-4:] == ["2", "0", "2", "4"]  # every digit is its own token
    assert "Ġreturn" in tokenizer.get_vocab()  # merges were learned, with the space folded in


def test_special_token_text_in_data_is_never_learned_as_the_special_token(tmp_path):
    poisoned = [
        text + "x = '<fim_middle>'  # <|endoftext|><fim_middle>\n<|endoftext|>\n" * 5 for text in make_code(1, 100)
    ]
    # The guarantee: the pre-tokenizer cuts every special token's text into several pieces, so no merge spans it.
    for token in STARCODER2_SPECIAL_TOKENS:
        assert len(new_bpe_tokenizer().pre_tokenizer.pre_tokenize_str(token)) >= 3, token
    tokenizer = train_tokenizer(iter(poisoned), vocab_size=800, output_dir=tmp_path / "tok")
    assert learned_special_tokens(tokenizer.backend_tokenizer) == []

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    backend = loaded.backend_tokenizer
    backend.encode_special_tokens = True
    ids = backend.encode(poisoned[0]).ids
    assert not SPECIAL_IDS & set(ids)
    assert loaded.decode(ids) == poisoned[0]
    assert not SPECIAL_IDS & set(loaded(poisoned[0], split_special_tokens=True)["input_ids"])
    backend.encode_special_tokens = False  # with parsing on, the text does become control ids
    assert {0, 2} <= set(backend.encode(poisoned[0]).ids)


def test_without_the_byte_level_regex_bpe_would_learn_special_tokens():
    # The counterfactual that the pre-tokenizer guards against, and proof that the check can fail.
    tokenizer = new_bpe_tokenizer()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=STARCODER2_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["<fim_middle>a<fim_middle>b\n"] * 50, trainer=trainer)
    assert "<fim_middle>" in learned_special_tokens(tokenizer)


def test_per_file_layout_max_files_and_null_contents(tmp_path):
    table = pa.table({"content": ["a = 1\n", None, "b = 2\n", "c = 3\n"], "language": ["Python"] * 4})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    assert list(iter_parquet_contents(tmp_path)) == ["a = 1\n", "b = 2\n", "c = 3\n"]
    assert list(iter_parquet_contents(tmp_path, max_files=2)) == ["a = 1\n", "b = 2\n"]


def test_data_errors_name_the_problem(tmp_path):
    with pytest.raises(RecipeError, match="no .parquet files"):
        list(iter_parquet_contents(tmp_path))
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(RecipeError, match=r"bad\.parquet.*columns are text"):
        list(iter_parquet_contents(tmp_path))
    with pytest.raises(RecipeError, match="--vocab_size"):
        train_tokenizer(iter(["x"]), vocab_size=100)
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"content": pa.array([None], pa.string())}), empty / "train.parquet")
    with pytest.raises(RecipeError, match="no file contents"):
        train_tokenizer_from_parquet(empty, 400, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing saved


def test_load_tokenizer_validates_special_tokens(tmp_path):
    tokenizer = train_tokenizer(iter(make_code(2, 20)), vocab_size=400, output_dir=tmp_path / "good")
    assert load_tokenizer(str(tmp_path / "good")).convert_tokens_to_ids("<fim_middle>") == 2

    # The same tokenizer with its FIM tokens renamed is refused, naming the recipe key.
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for entry in state["added_tokens"]:
        entry["content"] = entry["content"].replace("fim_", "infill_")
    state["model"]["vocab"] = {k.replace("fim_", "infill_"): v for k, v in state["model"]["vocab"].items()}
    (tmp_path / "no_fim").mkdir()
    (tmp_path / "no_fim" / "tokenizer.json").write_text(json.dumps(state))
    config = json.loads((tmp_path / "good" / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t.replace("fim_", "infill_") for t in config["extra_special_tokens"]]
    (tmp_path / "no_fim" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="tokenizer_name_or_path:.*<fim_prefix>"):
        load_tokenizer(str(tmp_path / "no_fim"))
    with pytest.raises(RecipeError, match="tokenizer_name_or_path: could not load"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(RecipeError, match="tokenizer_name_or_path: not set"):
        load_tokenizer(None)
