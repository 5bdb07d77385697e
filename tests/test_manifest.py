"""A prepared folder's manifest (data/store/manifest.py) through the real commands: prepare_data.py --tasks 2 writes
it, training and a second preparation into the same folder check it; resumed and extended preparations do only
what is missing."""

import json
import os
from dataclasses import fields, replace

import numpy as np
import pytest
from conftest import load_script, prepare_recipe, random_code, random_repositories, write_repository_shards

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data import prepare
from starcoder2_train.data.store import manifest as manifest_module
from starcoder2_train.data.store.manifest import MANIFEST, check_manifest, read_manifest, tokenizer_identity
from starcoder2_train.data.store.prepared import open_store

prepare_data = load_script("prepare_data")
TWO_TASKS = ["--tasks", "2", "--workers", "1", "--disable_tqdm"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_repository_shards(tmp_path_factory.mktemp("manifest") / "shards", random_repositories(24, seed=3))


recipe = prepare_recipe


def mtimes(folder) -> dict:
    return {path: os.stat(os.path.join(folder, path)).st_mtime_ns for path in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def prepared(shards, tokenizer_dir, tmp_path_factory):
    """A file-level FIM store of one epoch (a copy per data epoch), from two tasks."""
    root = tmp_path_factory.mktemp("prepared")
    prepare_data.main([recipe(root, shards, tokenizer_dir), "--output", str(root / "store"), *TWO_TASKS])
    return root / "store"


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, tokenizer):
    """A BPE of the same vocabulary size as conftest's, trained on other text: other ids for the same code."""
    import random

    from starcoder2_train.data.tokens.tokenizer import train_tokenizer

    rng = random.Random(99)
    path = tmp_path_factory.mktemp("other_tokenizer")
    train_tokenizer(iter([random_code(rng, 20, 40)[::-1] for _ in range(300)]), vocab_size=600, output_dir=path)
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(str(path))
    assert len(other) == len(tokenizer)  # the size alone cannot tell them apart
    return str(path)


def test_the_manifest_says_what_the_folder_holds(prepared, tokenizer, shards):
    manifest = read_manifest(str(prepared))
    assert manifest["format_version"] == 1 and manifest["tokenizer"] == tokenizer_identity(tokenizer)
    assert manifest["tokenizer"]["size"] == len(tokenizer)
    assert manifest["data"]["fim_level"] == "file" and manifest["data"]["fim_rate"] == 0.5
    assert manifest["data"]["eval_fraction"] == 0.1 and manifest["data"]["languages"] is None
    assert manifest["sources"][0]["dataset_name_or_path"] == shards
    assert manifest["epochs"] == 1 and manifest["tasks"] == 2 and manifest["seed"] == 42
    (tokens,) = manifest["stages"]
    assert tokens == {"name": "tokens", "logging_dir": "logs", "tasks": 2, "completed": 2, "first_epoch": 0,
                      "epochs": 1}  # fmt: skip
    assert not [name for name in os.listdir(prepared) if name.endswith(".partial")]  # written by a rename


def test_every_data_key_is_either_checked_or_read_at_training_time():
    """A new DataArguments key must be classified: does it shape the prepared tokens?"""
    classified = {*manifest_module.CHECKED_KEYS, *manifest_module.FILE_FIM_KEYS, *manifest_module.READ_TIME_KEYS}
    assert {f.name for f in fields(DataArguments)} - classified == set()
    assert not set(manifest_module.CHECKED_KEYS) & set(manifest_module.READ_TIME_KEYS)


def test_training_refuses_a_store_of_another_tokenizer_fim_level_or_data_key(
    prepared, shards, tokenizer, tokenizer_dir, other_tokenizer
):
    from transformers import AutoTokenizer

    same = DataArguments(prepared_data_dir=str(prepared), tokenizer_name_or_path=tokenizer_dir, eval_fraction=0.1)
    check_manifest(str(prepared), same, tokenizer)  # the recipe it was prepared with
    check_manifest(str(prepared), replace(same, seq_length=128), tokenizer)  # read-time key
    with pytest.raises(RecipeError) as raised:
        check_manifest(str(prepared), same, AutoTokenizer.from_pretrained(other_tokenizer))
    message = str(raised.value)
    assert message.startswith(f"prepared_data_dir: {prepared} was prepared with other settings than the recipe's: ")
    assert f"tokenizer_name_or_path: the folder has {tokenizer_dir} (600 tokens, sha256 " in message
    assert f"the recipe {other_tokenizer} (600 tokens, sha256 " in message
    assert "prepare again with the recipe into a new folder" in message
    window = replace(same, fim_level="window")
    with pytest.raises(RecipeError, match=r"fim_level: the folder has file \(file-level FIM in the tokens\), the "
                       r"recipe window \(no FIM in the tokens\)"):  # fmt: skip
        check_manifest(str(prepared), window, tokenizer)
    python = replace(same, languages=["Python"], fim_spm_rate=0.1)
    with pytest.raises(RecipeError) as raised:
        check_manifest(str(prepared), python, tokenizer)
    assert (
        'fim_spm_rate: the folder has 0.5, the recipe 0.1; languages: the folder has unset, the recipe ["Python"]'
        in (str(raised.value))
    )


def test_a_store_prepared_at_window_is_refused_under_a_recipe_at_file(shards, tokenizer, tokenizer_dir, tmp_path):
    output = tmp_path / "window"
    prepare_data.main([recipe(tmp_path, shards, tokenizer_dir, fim_level="window"), "--output", str(output),
                       *TWO_TASKS])  # fmt: skip
    data = read_manifest(str(output))["data"]
    assert data["fim_level"] == "window" and "fim_rate" not in data  # drawn at read time: not checked
    args = DataArguments(prepared_data_dir=str(output), eval_fraction=0.1, fim_level="window", fim_rate=0.9)
    check_manifest(str(output), args, tokenizer)
    with pytest.raises(RecipeError, match=r"fim_level: the folder has window \(no FIM in the tokens\), the recipe "
                       r"file \(file-level FIM in the tokens\)"):  # fmt: skip
        check_manifest(str(output), replace(args, fim_level="file"), tokenizer)
    # fim_level file at fim_rate 0 puts no FIM in the tokens either: the same store as window.
    check_manifest(str(output), replace(args, fim_level="file", fim_rate=0.0), tokenizer)


def test_training_refuses_a_mismatched_store_before_step_1(prepared, shards, tokenizer_dir, tmp_path):
    run_pretrain = load_script("run_pretrain")
    path = recipe(tmp_path, shards, tokenizer_dir, languages=["Python"], max_steps=1, save_strategy="no")
    with pytest.raises(RecipeError, match=r'languages: the folder has unset, the recipe \["Python"\]'):
        run_pretrain.main([path, "--prepared_data_dir", str(prepared), "--use_cpu", "true"])
    assert not (tmp_path / "run").exists()  # refused before anything was written, the run recipe included
    inspect_data = load_script("inspect_data")
    with pytest.raises(RecipeError, match="languages: the folder has unset"):
        inspect_data.main([path, "--prepared_data_dir", str(prepared), "--output", str(tmp_path / "s.jsonl")])
    # The recipe it was prepared with trains on it (the seed and seq_length are read-time keys).
    path = recipe(tmp_path, shards, tokenizer_dir, max_steps=1, save_strategy="no", seed=3)
    trainer = run_pretrain.main(
        [path, "--prepared_data_dir", str(prepared), "--use_cpu", "true", "--seq_length", "32"]
    )
    assert trainer.state.global_step == 1


def test_a_folder_prepared_before_manifests_is_refused(prepared, shards, tokenizer, tokenizer_dir, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    os.remove(old / MANIFEST)
    args = DataArguments(prepared_data_dir=str(old), eval_fraction=0.1)
    with pytest.raises(RecipeError, match=f"{old}: no manifest.json; it was prepared before preparations recorded"):
        check_manifest(str(old), args, tokenizer)
    before = mtimes(old)
    with pytest.raises(RecipeError, match=r"cannot check .* --output NEW_DIR"):
        prepare_data.main([recipe(tmp_path, shards, tokenizer_dir), "--output", str(old), *TWO_TASKS])
    assert mtimes(old) == before


def test_other_settings_into_a_prepared_folder_are_refused_by_name_before_any_task(
    prepared, shards, tokenizer_dir, other_tokenizer, tmp_path
):
    before = mtimes(prepared)
    path = recipe(tmp_path, shards, tokenizer_dir)
    for words, expected in [
        (["--languages", "Python"], 'languages: the folder has unset, this command ["Python"]'),
        (["--eval_fraction", "0.2"], "eval_fraction: the folder has 0.1, this command 0.2"),
        (["--tokenizer_name_or_path", other_tokenizer], f"tokenizer_name_or_path: the folder has {tokenizer_dir}"),
        (["--tasks", "3"], "--tasks: the folder has 2, this command 3"),
        (["--seed", "7"], "seed: the folder has 42, this command 7"),  # file-level FIM draws
    ]:
        words = [*TWO_TASKS, *words] if words[0] != "--tasks" else [*words, "--disable_tqdm"]
        with pytest.raises(RecipeError) as raised:
            prepare_data.main([path, "--output", str(prepared), *words])
        assert str(raised.value).startswith(f"--output: {prepared} holds a preparation with other settings: ")
        assert expected in str(raised.value) and "prepare into a new --output" in str(raised.value)
    assert mtimes(prepared) == before  # nothing written, no task started


def test_an_interrupted_preparation_resumed_redoes_only_the_failed_task(shards, tokenizer_dir, tmp_path, monkeypatch):
    path, output = recipe(tmp_path, shards, tokenizer_dir), tmp_path / "resumed"
    original = prepare.StoreWriter.run

    def failing(self, data=None, rank=0, world_size=1):
        if rank == 1:
            raise OSError("killed (injected)")
        yield from original(self, data, rank, world_size)

    monkeypatch.setattr(prepare.StoreWriter, "run", failing)
    with pytest.raises(OSError, match="injected"):
        prepare_data.main([path, "--output", str(output), *TWO_TASKS])
    assert read_manifest(str(output))["stages"][0]["completed"] == 1  # written when the run ended, failed or not
    monkeypatch.setattr(prepare.StoreWriter, "run", original)
    done = output / "train" / "epoch-0" / "part-00000-of-00002.tokens"
    written = os.stat(done).st_mtime_ns
    prepare_data.main([path, "--output", str(output), *TWO_TASKS])
    assert os.stat(done).st_mtime_ns == written  # task 0 did not run again
    assert read_manifest(str(output))["stages"][0]["completed"] == 2
    # A task whose completion and part are lost (a node wiped) is the one task the rerun does.
    os.remove(output / "logs" / "completions" / "00001")
    for suffix in ("tokens", "offsets", "json"):
        os.remove(output / "train" / "epoch-0" / f"part-00001-of-00002.{suffix}")
    prepare_data.main([path, "--output", str(output), *TWO_TASKS])
    assert os.stat(done).st_mtime_ns == written
    assert open_store(str(output), "train", 0).num_examples > 0


def test_more_epochs_of_a_file_level_store_prepare_only_the_new_ones(prepared, shards, tokenizer_dir, tmp_path):
    """--epochs 3 into a folder of 1: epochs 1 and 2 made in their own logging dir, equal to a fresh preparation's;
    epoch 0, eval and the held-out repositories untouched."""
    import shutil

    extended = tmp_path / "extended"
    shutil.copytree(prepared, extended)
    kept = {folder: mtimes(extended / folder) for folder in ("train/epoch-0", "eval/epoch-0", "eval/repositories")}
    path = recipe(tmp_path, shards, tokenizer_dir)
    prepare_data.main([path, "--output", str(extended), "--epochs", "3", *TWO_TASKS])
    assert {folder: mtimes(extended / folder) for folder in kept} == kept
    manifest = read_manifest(str(extended))
    assert manifest["epochs"] == 3
    assert [(s["logging_dir"], s["first_epoch"], s["epochs"], s["completed"]) for s in manifest["stages"]] == [
        ("logs", 0, 1, 2),
        ("logs-epochs-1-2", 1, 3, 2),
    ]
    fresh = tmp_path / "fresh"
    prepare_data.main([path, "--output", str(fresh), "--epochs", "3", *TWO_TASKS])
    for split, epoch in (("train", 0), ("train", 1), ("train", 2), ("eval", 0)):
        ours, theirs = open_store(str(extended), split, epoch), open_store(str(fresh), split, epoch)
        assert np.array_equal(ours.tokens(0, ours.num_tokens), theirs.tokens(0, theirs.num_tokens))
    # Again with the same --epochs (or fewer): nothing left to do, nothing rewritten.
    before = mtimes(extended / "train" / "epoch-2")
    prepare_data.main([path, "--output", str(extended), "--epochs", "2", *TWO_TASKS])
    assert mtimes(extended / "train" / "epoch-2") == before and read_manifest(str(extended))["epochs"] == 3


def test_a_mixture_prepares_each_source_into_its_own_folder(shards, tokenizer, tokenizer_dir, tmp_path):
    mine = write_repository_shards(tmp_path / "mine", random_repositories(10, seed=8), num_files=1)
    mixture = [
        {"name": "stack", "dataset_name_or_path": shards, "weight": 0.8},
        {"name": "mine", "dataset_name_or_path": mine, "weight": 0.2, "languages": ["Python"]},
    ]
    path = recipe(tmp_path, None, tokenizer_dir, dataset_mixture=mixture)
    output = tmp_path / "mixture"
    prepare_data.main([path, "--output", str(output), *TWO_TASKS])
    stack, own = read_manifest(str(output / "stack")), read_manifest(str(output / "mine"))
    assert stack["sources"][0]["name"] == "stack" and stack["data"]["languages"] is None
    assert own["sources"][0]["weight"] == pytest.approx(0.2) and own["data"]["languages"] == ["Python"]
    assert open_store(str(output / "mine"), "train", 0).num_examples > 0
    from starcoder2_train.data.store.manifest import check_prepared_sources
    from starcoder2_train.recipe import RecipeParser

    _, data_args, _ = RecipeParser().parse([path, "--prepared_data_dir", str(output)])
    check_prepared_sources(data_args, tokenizer)
    mixture[1]["languages"] = ["Rust"]
    _, data_args, _ = RecipeParser().parse(
        [recipe(tmp_path, None, tokenizer_dir, dataset_mixture=mixture), "--prepared_data_dir", str(output)]
    )
    with pytest.raises(RecipeError, match=f"{output / 'mine'} was prepared .* languages: the folder has"):
        check_prepared_sources(data_args, tokenizer)


@pytest.mark.slow  # a subprocess: ~10 s of imports on this 2-core box
def test_a_refusal_is_one_error_line_and_a_damaged_manifest_is_named(prepared, shards, tokenizer, tokenizer_dir,
                                                                     tmp_path):  # fmt: skip
    import shutil
    import subprocess
    import sys

    from conftest import LAUNCH_ENV

    path = recipe(tmp_path, shards, tokenizer_dir)
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "prepare_data.py")
    process = subprocess.run(
        [sys.executable, script, path, "--output", str(prepared), "--languages", "Python", *TWO_TASKS],
        env=LAUNCH_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr[-2000:]
    assert process.stderr.strip().splitlines()[-1].startswith(f"error: --output: {prepared} holds a preparation")
    damaged = tmp_path / "damaged"
    shutil.copytree(prepared, damaged)
    args = DataArguments(prepared_data_dir=str(damaged), eval_fraction=0.1)
    (damaged / MANIFEST).write_text('{"format_version": 1, "tokeni')
    with pytest.raises(RecipeError, match=r"manifest.json: not a readable manifest \(.*\); prepare the folder again"):
        check_manifest(str(damaged), args, tokenizer)
    (damaged / MANIFEST).write_text(json.dumps({**read_manifest(str(prepared)), "format_version": 2}))
    with pytest.raises(RecipeError, match="format_version 2, and this version of starcoder2-train reads 1 at most"):
        check_manifest(str(damaged), args, tokenizer)
