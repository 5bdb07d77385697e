"""The recipe's shared facts: each defined once in configs/shared.py, each refused with an error naming its key."""

import pytest
import torch
from conftest import load_script

from starcoder2_train.configs import (
    DataArguments,
    PretrainingArguments,
    RecipeError,
    is_hub_id,
    tokens_per_step,
    torch_dtype,
    windows_per_step,
)
from starcoder2_train.data.filters.splits import repository_split, shard_repositories
from starcoder2_train.recipe import RecipeParser


def parse(tmp_path, *words):
    return RecipeParser().parse(
        ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true", *words]
    )


def test_tokenizer_defaults_to_the_checkpoint_once_in_the_parser(tmp_path):
    _, data_args, _ = parse(tmp_path, "--model_name_or_path", "me/model", "--dataset_name_or_path", "d")
    assert data_args.tokenizer_name_or_path == "me/model"
    _, data_args, _ = parse(
        tmp_path, "--model_name_or_path", "me/model", "--tokenizer_name_or_path", "tok", "--dataset_name_or_path", "d"
    )
    assert data_args.tokenizer_name_or_path == "tok"
    _, data_args, _ = parse(tmp_path, "--model_config", "test", "--dataset_name_or_path", "d")
    assert data_args.tokenizer_name_or_path is None  # load_tokenizer then says what to set


@pytest.mark.parametrize(
    "words,message",
    [
        (["--eval_tasks", "loss", "humaneval"], r"eval_tasks: humaneval is not a training-time task \(it runs in "),
        (["--eval_tasks", "perplexity"], "eval_tasks: perplexity is not a training-time task; choose among loss, fim"),
        (["--eval_fraction", "1.0"], r"eval_fraction: must be in \[0, 1\)"),
        (["--num_shards", "2", "--shard_index", "2"], r"shard_index: must be in \[0, num_shards=2\), got 2"),
        (["--num_shards", "0"], "num_shards: must be at least 1"),
        (["--fim_eval_lines_per_file", "0"], "fim_eval_lines_per_file: must be at least 1, got 0"),
        (["--fim_eval_mode", "msp"], "fim_eval_mode: 'msp' is not one of psm, spm"),
        (["--muon", "true", "--muon_momentum", "1.0"], "muon_learning_rate must be positive and muon_momentum in"),
        (["--torch_dtype", "fp8"], "torch_dtype: 'fp8' is not one of auto, bfloat16, float16, float32"),
    ],
)
def test_bad_values_name_their_key(tmp_path, words, message):
    with pytest.raises(RecipeError, match=message):
        parse(tmp_path, "--model_config", "test", "--dataset_name_or_path", "d", *words)


def test_the_pipeline_checks_splits_and_shards_with_the_same_rules(tmp_path):
    from datasets import Dataset

    rows = Dataset.from_dict({"repo_name": [f"o/r{i}" for i in range(10)]})
    with pytest.raises(RecipeError, match=r"eval_fraction: must be in \[0, 1\)"):
        repository_split(rows, 1.0)
    with pytest.raises(RecipeError, match=r"shard_index: must be in \[0, num_shards=3\), got 3"):
        shard_repositories(rows, 3, 3)
    with pytest.raises(RecipeError, match="num_shards: must be at least 1"):
        DataArguments(dataset_name_or_path="d", num_shards=0)


def test_hub_ids_dtypes_and_tokens_per_step(tmp_path, monkeypatch):
    assert is_hub_id("bigcode/starcoder2-3b") and not is_hub_id("bigcode/starcoder2-3b/extra")
    assert not is_hub_id(None) and not is_hub_id("no-slash")
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("owner/name")  # a local path always wins
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("auto") == "auto"
    args = PretrainingArguments(
        output_dir=str(tmp_path / "o"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        use_cpu=True,
        report_to="none",
    )
    assert windows_per_step(args) == 12 and tokens_per_step(args, 512) == 12 * 512


def test_a_training_run_refuses_humaneval_before_any_work(tmp_path, code_shards, tokenizer_dir):
    with pytest.raises(RecipeError, match="eval_tasks: humaneval"):
        load_script("run_pretrain").main(
            [
                "--model_config", "test", "--dataset_name_or_path", code_shards,
                "--tokenizer_name_or_path", tokenizer_dir, "--output_dir", str(tmp_path / "out"),
                "--eval_tasks", "humaneval", "--use_cpu", "true", "--report_to", "none",
            ]
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
