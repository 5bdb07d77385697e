"""Preemption: SIGTERM/SIGUSR1 → a complete checkpoint at the same step on every rank → exit 75 → the same command
resumes and trains exactly as an uninterrupted run (losses within rel 1e-5), in one process and under ZeRO-2 with
2 processes (signal to one rank only). Real processes; the training steps are slowed by a test-only driver
(tests write it; nothing in the package knows about it) so that a signal lands mid-run."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LAUNCH_ENV, random_repositories, write_repository_shards

from starcoder2_train.training.checkpoints import COMPLETE_MARKER, newest_complete_checkpoint, verify_checkpoint
from starcoder2_train.training.preemption import REQUEUE_EXIT_CODE, REQUEUE_FILE_ENV, PreemptionCallback

ROOT = Path(__file__).parents[1]

# Prints each optimizer step, sleeps STEP_DELAY after it (before the preemption check of that step), and, with
# SLOW_SAVE=N, announces the optimizer file of checkpoint N and sleeps 120 s before writing it.
DRIVER = """
import importlib.util, os, sys, time
import torch
from transformers import TrainerCallback
import starcoder2_train.training.trainer as trainer_module

DELAY, SLOW_SAVE = float(os.environ.get("STEP_DELAY", "0")), os.environ.get("SLOW_SAVE")

class Steps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step} RANK {args.process_index} PID {os.getpid()}", flush=True)
        time.sleep(DELAY)

init = trainer_module.PretrainingTrainer.__init__
def patched_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.add_callback(Steps())
trainer_module.PretrainingTrainer.__init__ = patched_init

save = torch.save
def slow_save(obj, path, *args, **kwargs):
    if SLOW_SAVE and str(path).endswith(os.path.join(f"checkpoint-{SLOW_SAVE}", "optimizer.pt")):
        print("SAVING", path, flush=True)
        time.sleep(120)
    return save(obj, path, *args, **kwargs)
torch.save = slow_save

spec = importlib.util.spec_from_file_location("run_pretrain", os.path.join("scripts", "run_pretrain.py"))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    """A saved starting model, shards, a recipe of 8 steps (no saves of its own) and the driver."""
    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.data.tokenizer import load_tokenizer
    from starcoder2_train.model.factory import create_model

    root = tmp_path_factory.mktemp("preemption")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    model.save_pretrained(root / "start")
    tokenizer.save_pretrained(root / "start")
    shards = write_repository_shards(root / "shards", random_repositories(80, seed=41), num_files=1)
    values = dict(
        model_name_or_path=str(root / "start"),
        torch_dtype="float32",
        attn_implementation="sdpa",
        dataset_name_or_path=shards,
        seq_length=64,
        max_steps=8,
        learning_rate=3e-3,
        warmup_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=5,
        bf16=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    recipe = root / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    return root, recipe, driver


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def one_process(recipe, driver, out) -> list[str]:
    command = [sys.executable, str(driver), str(recipe), "--per_device_train_batch_size", "4", "--use_cpu", "true"]
    return command + ["--output_dir", str(out)]


def two_processes(recipe, driver, out) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += ["accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "2", "--main_process_port", "0"]
    return command + [str(driver), str(recipe), "--per_device_train_batch_size", "2", "--output_dir", str(out)]


def run(command, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=ROOT, env=dict(LAUNCH_ENV, **env), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def signal_mid_run(command, signum, at_step: int, rank: int, **env) -> tuple[int, str, float]:
    """Start `command`, send `signum` to the process of `rank` once it has finished step `at_step`; returns
    (exit status, output, seconds from the signal to the exit)."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=dict(LAUNCH_ENV, STEP_DELAY="1.0", **env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines, signalled = [], None
    for line in process.stdout:
        lines.append(line)
        match = re.match(r"STEP (\d+) RANK (\d+) PID (\d+)", line)
        if signalled is None and match and int(match[1]) == at_step and int(match[2]) == rank:
            os.kill(int(match[3]), signum)
            signalled = time.monotonic()
    status = process.wait(timeout=300)
    assert signalled is not None, "".join(lines)[-5000:]
    return status, "".join(lines), time.monotonic() - signalled


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, recipe, driver = setup
    run(one_process(recipe, driver, root / "reference"))
    return losses(root / "reference")


@pytest.mark.slow
def test_one_process_stops_at_a_complete_checkpoint_and_resumes_like_an_uninterrupted_run(setup, uninterrupted):
    root, recipe, driver = setup
    out = root / "one"
    requeue_file = root / "requeue-one.json"
    status, output, seconds = signal_mid_run(
        one_process(recipe, driver, out), signal.SIGTERM, at_step=3, rank=0, **{REQUEUE_FILE_ENV: str(requeue_file)}
    )
    assert status == REQUEUE_EXIT_CODE, output[-5000:]
    assert seconds < 30, output[-3000:]
    assert "preemption: SIGTERM received; saving a checkpoint at step 3" in output
    checkpoint, skipped = newest_complete_checkpoint(str(out))
    assert checkpoint == str(out / "checkpoint-3") and skipped == []
    assert verify_checkpoint(checkpoint) == []
    assert json.loads(requeue_file.read_text())["step"] == 3
    assert not (out / "model.safetensors").exists()  # stopped: no final model, no evaluation
    # The same command again resumes from checkpoint-3 and trains the remaining steps exactly.
    result = run(one_process(recipe, driver, out) + ["--log_level", "info"])
    assert f"resuming from {checkpoint}" in result.stdout + result.stderr
    assert losses(out) == pytest.approx(uninterrupted, rel=1e-5) and len(uninterrupted) == 8


@pytest.mark.slow
def test_two_deepspeed_ranks_stop_at_the_same_step_when_only_one_is_signalled(setup, uninterrupted):
    """SIGUSR1 to rank 1 alone: the gloo all-reduce stops rank 0 at the same step; ZeRO-2 shards of both ranks
    and both RNG states are in the checkpoint; the relaunch resumes and matches the 1-process run."""
    pytest.importorskip("deepspeed")
    root, recipe, driver = setup
    out = root / "two"
    requeue_file = root / "requeue-two.json"
    status, output, _ = signal_mid_run(
        two_processes(recipe, driver, out), signal.SIGUSR1, at_step=3, rank=1, **{REQUEUE_FILE_ENV: str(requeue_file)}
    )
    # accelerate's launcher reports a worker's status 75 as its own 1; the requeue file says why.
    assert status != 0 and f"exitcode  : {REQUEUE_EXIT_CODE}" in output, output[-5000:]
    record = json.loads(requeue_file.read_text())
    assert record["step"] in (3, 4) and record["exit_code"] == REQUEUE_EXIT_CODE
    checkpoint = out / f"checkpoint-{record['step']}"
    assert newest_complete_checkpoint(str(out))[0] == str(checkpoint)
    assert verify_checkpoint(str(checkpoint), world_size=2) == []
    assert {"rng_state_0.pth", "rng_state_1.pth", COMPLETE_MARKER} <= set(os.listdir(checkpoint))
    assert len(list(checkpoint.glob("global_step*/*optim_states.pt"))) == 2
    assert "saving a checkpoint at step" in output and "a signal to another rank" in output
    run(two_processes(recipe, driver, out))
    assert losses(out) == pytest.approx(uninterrupted, rel=1e-5)


def test_the_handler_only_sets_a_flag_and_one_process_agrees_with_itself():
    from transformers import TrainerControl, TrainerState

    callback = PreemptionCallback(check_every_steps=2).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert callback.received == signal.SIGUSR1 and not callback.requested
        state, control = TrainerState(), TrainerControl()
        state.global_step = 3  # not a checking step
        callback.on_step_end(None, state, control)
        assert not control.should_training_stop
        state.global_step = 4
        callback.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop and not control.should_evaluate
        assert callback.stopped_at == 4
    finally:
        callback.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_the_sbatch_script_parses_and_requeues_on_the_same_exit_code_and_file():
    script = (ROOT / "scripts" / "slurm" / "train.sbatch").read_text()
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}" in script
    assert f"export {REQUEUE_FILE_ENV}=" in script
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and 'trap "" USR1' in script
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm" / "train.sbatch")], capture_output=True)
    assert result.returncode == 0, result.stderr
