"""Checkpoints are never half-written: a save killed with SIGKILL or stopped by a full disk leaves the previous
complete checkpoint as the one a restart picks; selection skips (and names) incomplete ones; save_total_limit never
deletes the newest complete one; output_dir and resume_from_checkpoint of another recipe are refused."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import LAUNCH_ENV, load_script
from safetensors.torch import save_file
from test_preemption import ROOT, setup  # noqa: F401 - the recipe and driver fixture

from starcoder2_train.configs import RecipeError
from starcoder2_train.training.checkpoints import (
    COMPLETE_MARKER,
    STAGING_DIR,
    CheckpointError,
    _mark_complete,
    newest_complete_checkpoint,
    recipe_differences,
    resolve_resume,
    rotate,
    verify_checkpoint,
)


def fake_checkpoint(folder, step: int, complete: bool = True) -> str:
    """The files of a one-process Trainer checkpoint, small; marked complete unless told otherwise."""
    os.makedirs(folder)
    save_file({"weight": torch.arange(6.0)}, os.path.join(folder, "model.safetensors"))
    torch.save({"state": {0: torch.ones(3)}}, os.path.join(folder, "optimizer.pt"))
    torch.save({"last_epoch": step}, os.path.join(folder, "scheduler.pt"))
    torch.save({"cpu": torch.random.get_rng_state()}, os.path.join(folder, "rng_state.pth"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as handle:
        json.dump({"global_step": step}, handle)
    if complete:
        _mark_complete(str(folder), step)
    return str(folder)


def cut(path, keep: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def test_verify_names_a_cut_safetensors_file_a_cut_optimizer_and_a_missing_state(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoint-1", 1, complete=False)
    assert verify_checkpoint(folder) == []
    cut(os.path.join(folder, "model.safetensors"), 40)
    cut(os.path.join(folder, "optimizer.pt"), 100)
    os.remove(os.path.join(folder, "trainer_state.json"))
    problems = "\n".join(verify_checkpoint(folder))
    assert "model.safetensors" in problems and "truncated" in problems
    assert "optimizer.pt: not a complete torch.save file" in problems
    assert "trainer_state.json: missing" in problems


def test_a_restart_picks_the_newest_complete_checkpoint_and_logs_what_it_skipped(tmp_path, caplog):
    out = tmp_path / "out"
    fake_checkpoint(out / "checkpoint-2", 2)
    fake_checkpoint(out / "checkpoint-4", 4)
    cut(out / "checkpoint-4" / "optimizer.pt", 10)  # marked complete, then damaged: sizes differ from the marker
    fake_checkpoint(out / "checkpoint-6", 6, complete=False)  # what an in-place save killed half-way leaves
    fake_checkpoint(out / STAGING_DIR / "checkpoint-8", 8, complete=False)  # a save of ours that never finished
    args = SimpleNamespace(
        output_dir=str(out), resume_from_checkpoint=None, process_index=0, world_size=1, save_only_model=False
    )
    recipe = {"defining": {"seq_length": 64}, "recipe_values": {}}
    with caplog.at_level(logging.INFO, logger="starcoder2_train"):
        assert resolve_resume(args, recipe) == str(out / "checkpoint-2")
    log = caplog.text
    assert f"skipped {out / STAGING_DIR / 'checkpoint-8'}: a save that did not finish" in log
    assert f"skipped {out / 'checkpoint-6'}: no {COMPLETE_MARKER}" in log
    assert f"skipped {out / 'checkpoint-4'}: optimizer.pt: 10 bytes, marked" in log
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert json.loads((out / "run_recipe.json").read_text()) == recipe


def test_save_total_limit_keeps_the_newest_complete_checkpoint_and_never_counts_incomplete_ones(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4, 6):
        fake_checkpoint(out / f"checkpoint-{step}", step)
    fake_checkpoint(out / "checkpoint-8", 8, complete=False)
    fake_checkpoint(out / STAGING_DIR / "checkpoint-10", 10, complete=False)
    deleted = rotate(str(out), 1, keep=str(out / "checkpoint-2"))  # even when told to keep an older one
    assert sorted(os.listdir(out)) == [STAGING_DIR, "checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert str(out / "checkpoint-4") in deleted and os.listdir(out / STAGING_DIR) == []
    rotate(str(out), 1, keep=str(out / "checkpoint-6"))
    assert newest_complete_checkpoint(str(out))[0] == str(out / "checkpoint-6")
    assert (out / "checkpoint-8").is_dir()  # incomplete: neither kept in the count nor picked


def short_run(made, out, *words):
    root, recipe, _ = made
    run_pretrain = load_script("run_pretrain")
    argv = [str(recipe), "--output_dir", str(out), "--use_cpu", "true", "--per_device_train_batch_size", "4"]
    return run_pretrain.main(argv + list(words))


@pytest.mark.slow
def test_an_output_dir_or_a_checkpoint_of_another_recipe_is_refused_and_intervals_follow_the_recipe(
    setup,  # noqa: F811
    tmp_path,
):  # noqa: F811
    out = tmp_path / "out"
    short_run(setup, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    assert (out / "run_recipe.json").exists() and (out / "checkpoint-2" / "run_recipe.json").exists()
    with pytest.raises(RecipeError, match=rf"output_dir {out} holds a run .*seq_length: 64 there, 32 now"):
        short_run(setup, out, "--seq_length", "32")
    checkpoint = out / "checkpoint-2"
    with pytest.raises(RecipeError, match=rf"resume_from_checkpoint {checkpoint} was made by .*seq_length"):
        short_run(setup, tmp_path / "new", "--seq_length", "32", "--resume_from_checkpoint", str(checkpoint))
    assert "Use a new output_dir" in str(pytest.raises(RecipeError, short_run, setup, out, "--seed", "6").value)
    # Not defining: a resume with another save_steps saves at the recipe's interval, not the checkpoint's (2).
    short_run(setup, out, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3")
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-6"]


def test_a_key_added_since_the_checkpoint_counts_at_its_default():
    """A checkpoint written before this project had a key (its run_recipe.json lacks it) is the same run while
    the key keeps its default, and another run once the recipe changes it."""
    from starcoder2_train.configs import DataArguments, ModelArguments
    from starcoder2_train.training.checkpoints import run_recipe

    def recipe(**values):
        model_args = ModelArguments(model_config="test", **values)
        return run_recipe(model_args, DataArguments(dataset_name_or_path="data"), SimpleNamespace(seed=1), {})

    older = recipe()
    del older["defining"]["lora_r"], older["defaults"]["lora_r"]
    older.pop("defaults")  # written by a version that recorded no defaults either
    assert recipe_differences(older, recipe()) == []
    assert recipe_differences(older, recipe(lora_r=8)) == ["lora_r"]
    assert recipe_differences(recipe(), recipe(sliding_window=16)) == ["sliding_window"]


@pytest.mark.slow
def test_a_full_disk_during_a_save_fails_naming_the_folder_and_keeps_the_previous_checkpoint(
    setup,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    out = tmp_path / "out"
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    staging = out / STAGING_DIR / "checkpoint-4"
    with pytest.raises(CheckpointError) as raised:
        short_run(setup, out, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2")
    message = str(raised.value)
    assert f"saving checkpoint {out / 'checkpoint-4'} (written in {staging}) failed: OSError" in message
    assert "No space left on device" in message and f"a restart resumes from {out / 'checkpoint-2'}" in message
    assert not staging.exists() and not (out / "checkpoint-4").exists()  # the partial files are freed
    assert newest_complete_checkpoint(str(out)) == (str(out / "checkpoint-2"), [])


@pytest.mark.slow
def test_a_save_killed_half_way_leaves_the_previous_checkpoint_to_resume_from(setup):  # noqa: F811
    root, recipe, driver = setup
    out = root / "killed"
    command = [sys.executable, str(driver), str(recipe), "--per_device_train_batch_size", "4", "--use_cpu", "true"]
    command += ["--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "6"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=dict(LAUNCH_ENV, SLOW_SAVE="4"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("SAVING"):  # checkpoint-4's weights are written, its optimizer state is not
            process.send_signal(signal.SIGKILL)
            break
    assert process.wait(timeout=300) == -signal.SIGKILL, "".join(lines)[-5000:]
    staging = out / STAGING_DIR / "checkpoint-4"
    assert (staging / "model.safetensors").exists() and not (out / "checkpoint-4").exists()
    assert newest_complete_checkpoint(str(out)) == (
        str(out / "checkpoint-2"),
        [(str(staging), "a save that did not finish (killed or failed mid-save)")],
    )
    result = subprocess.run(
        command[:-2] + ["--max_steps", "6", "--log_level", "info"], cwd=ROOT, env=LAUNCH_ENV, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"skipped {staging}: a save that did not finish" in output
    assert f"resuming from {out / 'checkpoint-2'}" in output
    assert not staging.exists()  # removed by the next save's rotation
    assert [newest_complete_checkpoint(str(out))[0]] == [str(out / "checkpoint-6")]
    assert verify_checkpoint(str(out / "checkpoint-4")) == []
