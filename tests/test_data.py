"""The whole data pipeline on real parquet shards: determinism, sharding, resume, reporting."""

import json
import os

import pytest
from conftest import load_script, random_repositories, write_repository_shards

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.batches.collators import PackedCollator
from starcoder2_train.data.pipeline import build_packed_dataset, load_token_rows


def data_args(shards, tokenizer_dir, **overrides):
    values = dict(dataset_name_or_path=shards, tokenizer_name_or_path=tokenizer_dir, seq_length=64, num_proc=None)
    values.update(overrides)
    return DataArguments(**values)


def windows(dataset):
    return [tuple(dataset[i]["input_ids"].tolist()) for i in range(len(dataset))]


def test_same_samples_with_one_or_two_processes(code_shards, tokenizer_dir, tokenizer):
    one, _ = build_packed_dataset(data_args(code_shards, tokenizer_dir, num_proc=1), tokenizer, seed=3)
    two, _ = build_packed_dataset(data_args(code_shards, tokenizer_dir, num_proc=2), tokenizer, seed=3)
    assert len(one) > 50 and windows(one) == windows(two)


def test_shards_merged_equal_one_machine(code_shards, tokenizer_dir, tokenizer):
    import datasets

    whole, _ = load_token_rows(data_args(code_shards, tokenizer_dir), tokenizer, seed=3)
    parts = [
        load_token_rows(data_args(code_shards, tokenizer_dir, num_shards=2, shard_index=i), tokenizer, seed=3)[0]
        for i in range(2)
    ]
    assert 0 < len(parts[0]) < len(whole)
    merged = datasets.concatenate_datasets(parts)
    assert merged["input_ids"] == whole["input_ids"] and merged["repo_name"] == whole["repo_name"]


def test_restarting_at_sample_k_gives_the_same_samples(code_shards, tokenizer_dir, tokenizer):
    import torch

    dataset, _ = build_packed_dataset(data_args(code_shards, tokenizer_dir), tokenizer, seed=3)
    k = 17
    full = [b["input_ids"] for b in torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=PackedCollator())]
    resumed_dataset, _ = build_packed_dataset(data_args(code_shards, tokenizer_dir), tokenizer, seed=3)
    subset = torch.utils.data.Subset(resumed_dataset, range(k, len(resumed_dataset)))
    resumed = [
        b["input_ids"]
        for b in torch.utils.data.DataLoader(subset, batch_size=1, collate_fn=PackedCollator(), num_workers=2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(full[k:], resumed)) and len(resumed) == len(full) - k


def test_each_epoch_draws_its_own_order_and_fim(code_shards, tokenizer_dir, tokenizer):
    zero, _ = load_token_rows(data_args(code_shards, tokenizer_dir), tokenizer, seed=3, epoch=0)
    one, _ = load_token_rows(data_args(code_shards, tokenizer_dir), tokenizer, seed=3, epoch=1)
    assert zero["input_ids"] != one["input_ids"] and zero["repo_name"] == one["repo_name"]


def test_report_counts_fim_tokens_and_skips(tmp_path, tokenizer_dir, tokenizer):
    repos = random_repositories(60, seed=5)
    repos[0]["files"].append({"path": "empty.py", "content": "", "language": "Python"})
    repos[1]["files"].append({"path": "big.py", "content": "x" * 5000, "language": "Python"})
    shards = write_repository_shards(tmp_path / "shards", repos)
    (tmp_path / "shards" / "train-00002-of-00002.parquet").write_bytes(b"PAR1 this is not parquet")
    args = data_args(shards, tokenizer_dir, max_file_bytes=4000, fim_rate=1.0, fim_fragment_rate=1.0)
    packed, report = build_packed_dataset(args, tokenizer, seed=0, shuffle=False)
    assert report.repositories == 60 and report.files == sum(len(r["files"]) for r in repos) - 2
    assert report.files_fim_psm + report.files_fim_spm == report.files  # every file transformed at rate 1
    assert report.tokens == packed.total_tokens and report.windows == len(packed)
    assert report.packing_efficiency > 0.95
    skipped = " ".join(f"{k}={v}" for k, v in report.skipped.items())
    assert "empty content=1" in skipped and "larger than max_file_bytes=1" in skipped
    assert "unreadable parquet file=1" in skipped
    assert any(line.startswith("packing efficiency") for line in report.summary_lines())


def test_held_out_split_is_disjoint(code_shards, tokenizer_dir, tokenizer):
    args = data_args(code_shards, tokenizer_dir, eval_fraction=0.2)
    train, _ = load_token_rows(args, tokenizer, seed=0, split="train")
    held_out, _ = load_token_rows(args, tokenizer, seed=0, split="eval")
    assert len(held_out) > 5 and not set(train["repo_name"]) & set(held_out["repo_name"])
    assert len(train) + len(held_out) == 120


def test_a_tokenizer_without_fim_tokens_is_refused_by_the_pipeline(code_shards, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_special_tokens(["<|endoftext|>"])
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="lacks the special token"):
        build_packed_dataset(data_args(code_shards, "plain-tok"), plain, seed=0)


def test_inspect_data_writes_what_the_trainer_receives(code_shards, tokenizer_dir, tokenizer, tmp_path, capsys):
    script = load_script("inspect_data")
    out = tmp_path / "samples.jsonl"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_config: test\ndataset_name_or_path: {code_shards}\ntokenizer_name_or_path: {tokenizer_dir}\n"
        "seq_length: 64\nmax_steps: 5\nper_device_train_batch_size: 2\n"
    )
    report = script.main(
        [
            str(recipe),
            "--num_samples",
            "3",
            "--output",
            str(out),
            "--seq_length",
            "48",
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and all(len(s["input_ids"]) == 48 for s in lines)
    dataset, _ = build_packed_dataset(data_args(code_shards, tokenizer_dir, seq_length=48), tokenizer, seed=42)
    assert [s["input_ids"] for s in lines] == [dataset[i]["input_ids"].tolist() for i in range(3)]
    assert lines[0]["text"] == tokenizer.decode(lines[0]["input_ids"])
    printed = capsys.readouterr().out
    assert "packing efficiency" in printed and "files FIM-transformed" in printed and report.repositories == 120


def test_prepared_shards_from_two_machines_train_like_one(code_shards, tokenizer_dir, tokenizer, tmp_path):
    script = load_script("prepare_data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_config: test\ndataset_name_or_path: {code_shards}\ntokenizer_name_or_path: {tokenizer_dir}\n"
        f"seq_length: 64\neval_fraction: 0.1\noutput_dir: {tmp_path / 'o'}\n"
    )
    for index in range(2):  # two machines, e.g. a SLURM array of 2
        script.main(
            [str(recipe), "--output", str(tmp_path / "prepared"), "--tasks", "2", "--num_shards", "2"]
            + ["--shard_index", str(index)]
        )
    args = data_args(code_shards, tokenizer_dir, eval_fraction=0.1)
    direct, direct_report = build_packed_dataset(args, tokenizer, seed=42)
    prepared, prepared_report = build_packed_dataset(
        data_args(None, tokenizer_dir, prepared_data_dir=str(tmp_path / "prepared")), tokenizer, seed=42
    )
    assert windows(direct) == windows(prepared)
    assert prepared_report.skipped == direct_report.skipped and prepared_report.tokens == direct_report.tokens
    # The held-out repositories travel too: the evaluation tasks get the same rows as from the raw shards.
    from starcoder2_train.data.filters.splits import load_split_repositories
    from starcoder2_train.data.store.prepared import load_held_out_repositories
    from starcoder2_train.evaluation.held_out import task_inputs

    held_out = load_held_out_repositories(str(tmp_path / "prepared"))
    assert len(held_out) > 0 and held_out.to_list() == load_split_repositories(args, "eval")[0].to_list()
    assert (
        task_inputs(held_out, tokenizer, ["loss", "fim"], seed=1)[0]
        == task_inputs(load_split_repositories(args, "eval")[0], tokenizer, ["loss", "fim"], seed=1)[0]
    )
    with pytest.raises(RecipeError, match="lacks part-00001-of-00002 of 2 parts"):
        os.remove(tmp_path / "prepared" / "train" / "epoch-0" / "part-00001-of-00002.json")
        build_packed_dataset(
            data_args(None, tokenizer_dir, prepared_data_dir=str(tmp_path / "prepared")), tokenizer, seed=42
        )


def test_the_token_cache_follows_the_code_that_makes_the_rows(code_shards, tokenizer_dir, tokenizer, monkeypatch):
    import importlib
    import sys

    from starcoder2_train.data import pipeline

    before, _ = load_token_rows(data_args(code_shards, tokenizer_dir), tokenizer, seed=3)
    again, _ = load_token_rows(data_args(code_shards, tokenizer_dir), tokenizer, seed=3)
    assert again._fingerprint == before._fingerprint  # the cache is found again
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "the code changed")
    after, _ = load_token_rows(data_args(code_shards, tokenizer_dir), tokenizer, seed=3)
    assert after._fingerprint != before._fingerprint
    # code_fingerprint itself reads the source: an edited module gives another hash.
    monkeypatch.undo()
    original = pipeline.code_fingerprint()
    module = sys.modules["starcoder2_train.data.examples.fim"]
    inspect = importlib.import_module("inspect")
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda obj: real(obj) + ("\n# edited" if obj is module else ""))
    pipeline.code_fingerprint.cache_clear()
    try:
        assert pipeline.code_fingerprint() != original
    finally:
        monkeypatch.undo()
        pipeline.code_fingerprint.cache_clear()
    assert pipeline.code_fingerprint() == original


def test_later_epochs_are_made_when_training_reaches_them(code_shards, tokenizer_dir, tokenizer, tmp_path):
    import torch
    from transformers import TrainingArguments

    from starcoder2_train.data.pipeline import build_training_data
    from starcoder2_train.data.windows.epochs import DataEpochs

    args = data_args(code_shards, tokenizer_dir, num_proc=2)
    first, _ = build_packed_dataset(args, tokenizer, seed=3, epoch=0)
    needed = 2 * len(first) + 5  # into the third epoch
    training = TrainingArguments(
        output_dir=str(tmp_path), max_steps=needed, per_device_train_batch_size=1, seed=3, use_cpu=True
    )
    dataset, report = build_training_data(args, tokenizer, training)
    assert isinstance(dataset, DataEpochs) and len(dataset) == needed and dataset.epochs_made == 1  # before step 1
    eager = torch.utils.data.ConcatDataset(
        [build_packed_dataset(args, tokenizer, seed=3, epoch=e)[0] for e in range(3)]
    )
    # Read as training reads it: 2 data-loader workers (daemonic: they make the epochs without num_proc).
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=PackedCollator())
    lazily = torch.cat([batch["input_ids"] for batch in loader])
    assert lazily.shape[0] == needed
    assert all(torch.equal(lazily[i], torch.from_numpy(eager[i]["input_ids"])) for i in range(needed))
    assert dataset[needed - 1]["input_ids"].tolist() == eager[needed - 1]["input_ids"].tolist()
    assert dataset.epochs_made == 3 and report.repositories == 120
    with pytest.raises(IndexError):
        dataset[needed]


def test_too_few_prepared_epochs_fail_before_training(code_shards, tokenizer_dir, tokenizer, tmp_path):
    from transformers import TrainingArguments

    from starcoder2_train.data.pipeline import build_training_data

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_config: test\ndataset_name_or_path: {code_shards}\nseq_length: 64\noutput_dir: o\n")
    load_script("prepare_data").main(
        [str(recipe), "--output", str(tmp_path / "p"), "--tokenizer_name_or_path", tokenizer_dir, "--epochs", "2"]
    )
    args = data_args(None, tokenizer_dir, prepared_data_dir=str(tmp_path / "p"))
    both = sum(len(build_packed_dataset(args, tokenizer, seed=42, epoch=e)[0]) for e in range(2))
    training = TrainingArguments(output_dir=str(tmp_path), max_steps=both + 1, seed=42, use_cpu=True)
    training.per_device_train_batch_size = 1
    with pytest.raises(
        RecipeError, match=f"its 2 data epoch.s. hold {both:,} windows and max_steps needs {both + 1:,}"
    ):
        build_training_data(args, tokenizer, training)
    training.max_steps = both  # exactly the 2 prepared epochs
    assert len(build_training_data(args, tokenizer, training)[0]) == both
