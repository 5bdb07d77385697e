"""Preemption: SIGTERM/SIGUSR1 → a complete checkpoint at the same step on every rank → exit 75 → the same command
resumes and trains exactly as an uninterrupted run (losses within rel 1e-5, the same windows at every step, none
twice, none missed), in one process and under ZeRO-2 with 2 processes (signal to one rank only); and a ZeRO-3 job
of 2 processes killed outright after a checkpoint resumes from it the same way. Real processes; the training steps
are slowed by a test-only driver (tests write it; nothing in the package knows about it) so that a signal lands
mid-run."""

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
# SLOW_SAVE=N, announces the optimizer file of checkpoint N and sleeps 120 s before writing it. With WINDOW_LOG=DIR,
# each rank appends the identity (sha1 of input_ids) of every window it trains on, with the step, to
# DIR/rank<R>.jsonl.
DRIVER = """
import hashlib, importlib.util, json, os, sys, time
import torch
from transformers import TrainerCallback
import starcoder2_train.training.trainer as trainer_module

DELAY, SLOW_SAVE = float(os.environ.get("STEP_DELAY", "0")), os.environ.get("SLOW_SAVE")
WINDOW_LOG = os.environ.get("WINDOW_LOG")

training_step = trainer_module.PretrainingTrainer.training_step
def logged_training_step(self, model, inputs, *args, **kwargs):
    if WINDOW_LOG:
        rows = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in inputs["input_ids"].cpu()]
        os.makedirs(WINDOW_LOG, exist_ok=True)
        with open(os.path.join(WINDOW_LOG, f"rank{self.args.process_index}.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": self.state.global_step + 1, "windows": rows}) + "\\n")
    return training_step(self, model, inputs, *args, **kwargs)
trainer_module.PretrainingTrainer.training_step = logged_training_step

class Steps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        # One write of the whole line: both ranks share the launcher's pipe, and print's two writes (text, then
        # newline) interleave with the other rank's.
        sys.stdout.write(f"STEP {state.global_step} RANK {args.process_index} PID {os.getpid()}\\n")
        sys.stdout.flush()
        time.sleep(DELAY)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if WINDOW_LOG:  # this rank's weights after the last step, hashed, beside its windows
            weights = hashlib.sha1()
            for name, parameter in sorted(model.named_parameters()):
                weights.update(name.encode() + parameter.detach().float().cpu().numpy().tobytes())
            with open(os.path.join(WINDOW_LOG, f"weights{args.process_index}.txt"), "w") as handle:
                handle.write(weights.hexdigest())

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
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
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


def two_processes(recipe, driver, out, stage: int = 2) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [f"accelerate_configs/deepspeed_zero{stage}.yaml", "--num_processes", "2", "--main_process_port", "0"]
    return command + [str(driver), str(recipe), "--per_device_train_batch_size", "2", "--output_dir", str(out)]


def trained_windows(log_dir: Path) -> dict[int, list[str]]:
    """Step → the identities of the windows all ranks trained on at that step (sorted), from WINDOW_LOG files."""
    steps: dict[int, list[str]] = {}
    for path in sorted(log_dir.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["windows"])
    return {step: sorted(windows) for step, windows in sorted(steps.items())}


def assert_windows_continue(before: dict, after: dict, resumed_at: int, reference: dict) -> None:
    """The windows of the resumed run's history (those of `before` up to the checkpoint's step, then `after`) are
    exactly the uninterrupted run's, step by step: none is trained twice, none is missed."""
    assert min(after) == resumed_at + 1, (sorted(before), sorted(after))
    history = {step: windows for step, windows in before.items() if step <= resumed_at} | after
    assert history == reference
    every = [window for windows in history.values() for window in windows]
    assert len(every) == len(set(every)) == sum(map(len, reference.values()))


def run(command, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=ROOT, env=dict(LAUNCH_ENV, **env), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def step_markers(line: str) -> list[tuple[int, int, int]]:
    """(step, rank, pid) of every STEP marker in an output line, wherever it stands in the line: two ranks' lines
    can still meet in one read of the shared pipe."""
    return [tuple(map(int, match)) for match in re.findall(r"STEP (\d+) RANK (\d+) PID (\d+)", line)]


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
        for step, step_rank, pid in step_markers(line):
            if signalled is None and step == at_step and step_rank == rank:
                os.kill(pid, signum)
                signalled = time.monotonic()
    status = process.wait(timeout=300)
    assert signalled is not None, "".join(lines)[-5000:]
    return status, "".join(lines), time.monotonic() - signalled


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """The losses and the windows of each step of the run never stopped."""
    root, recipe, driver = setup
    run(one_process(recipe, driver, root / "reference"), WINDOW_LOG=str(root / "windows-reference"))
    windows = trained_windows(root / "windows-reference")
    assert sorted(windows) == list(range(1, 9)) and all(len(rows) == 4 for rows in windows.values())
    return losses(root / "reference"), windows


@pytest.mark.slow
def test_one_process_stops_at_a_complete_checkpoint_and_resumes_like_an_uninterrupted_run(setup, uninterrupted):
    root, recipe, driver = setup
    out = root / "one"
    requeue_file = root / "requeue-one.json"
    reference_losses, reference_windows = uninterrupted
    status, output, seconds = signal_mid_run(
        one_process(recipe, driver, out), signal.SIGTERM, at_step=3, rank=0,
        **{REQUEUE_FILE_ENV: str(requeue_file), "WINDOW_LOG": str(root / "windows-one-1")},
    )  # fmt: skip
    assert status == REQUEUE_EXIT_CODE, output[-5000:]
    assert seconds < 30, output[-3000:]
    assert "preemption: SIGTERM received; saving a checkpoint at step 3" in output
    checkpoint, skipped = newest_complete_checkpoint(str(out))
    assert checkpoint == str(out / "checkpoint-3") and skipped == []
    assert verify_checkpoint(checkpoint) == []
    assert json.loads(requeue_file.read_text())["step"] == 3
    assert not (out / "model.safetensors").exists()  # stopped: no final model, no evaluation
    # The same command again resumes from checkpoint-3 and trains the remaining steps exactly.
    result = run(one_process(recipe, driver, out) + ["--log_level", "info"], WINDOW_LOG=str(root / "windows-one-2"))
    assert f"resuming from {checkpoint}" in result.stdout + result.stderr
    assert losses(out) == pytest.approx(reference_losses, rel=1e-5) and len(reference_losses) == 8
    before, after = trained_windows(root / "windows-one-1"), trained_windows(root / "windows-one-2")
    assert max(before) == 3  # the signal's step is the last trained: nothing trained and lost
    assert_windows_continue(before, after, 3, reference_windows)


@pytest.mark.slow
def test_two_deepspeed_ranks_stop_at_the_same_step_when_only_one_is_signalled(setup, uninterrupted):
    """SIGUSR1 to rank 1 alone: the gloo all-reduce stops rank 0 at the same step; ZeRO-2 shards of both ranks
    and both RNG states are in the checkpoint; the relaunch resumes and matches the 1-process run."""
    pytest.importorskip("deepspeed")
    root, recipe, driver = setup
    out = root / "two"
    requeue_file = root / "requeue-two.json"
    reference_losses, reference_windows = uninterrupted
    status, output, _ = signal_mid_run(
        two_processes(recipe, driver, out), signal.SIGUSR1, at_step=3, rank=1,
        **{REQUEUE_FILE_ENV: str(requeue_file), "WINDOW_LOG": str(root / "windows-two-1")},
    )  # fmt: skip
    # Under the launcher with a requeue file the ranks exit 0 (the file says why): no ChildFailedError traceback.
    assert status == 0 and "ChildFailedError" not in output and "Traceback" not in output, output[-5000:]
    record = json.loads(requeue_file.read_text())
    assert record["step"] in (3, 4) and record["exit_code"] == REQUEUE_EXIT_CODE
    checkpoint = out / f"checkpoint-{record['step']}"
    assert newest_complete_checkpoint(str(out))[0] == str(checkpoint)
    assert verify_checkpoint(str(checkpoint), world_size=2) == []
    assert {"rng_state_0.pth", "rng_state_1.pth", COMPLETE_MARKER} <= set(os.listdir(checkpoint))
    assert len(list(checkpoint.glob("global_step*/*optim_states.pt"))) == 2
    assert "saving a checkpoint at step" in output and "a signal to another rank" in output
    run(two_processes(recipe, driver, out), WINDOW_LOG=str(root / "windows-two-2"))
    assert losses(out) == pytest.approx(reference_losses, rel=1e-5)
    before, after = trained_windows(root / "windows-two-1"), trained_windows(root / "windows-two-2")
    assert max(before) == record["step"]
    assert_windows_continue(before, after, record["step"], reference_windows)


@pytest.mark.slow
def test_two_zero3_ranks_killed_after_a_checkpoint_resume_with_the_same_windows_and_losses(setup, uninterrupted):
    """SIGKILL to the whole job (a node lost) two steps after checkpoint-3 under ZeRO-3: the restart takes
    checkpoint-3 (its parameter and optimizer shards of both ranks), trains steps 4-8 again on exactly the windows
    and to the losses of the run never stopped; steps 4-5 of the killed run are what was lost."""
    pytest.importorskip("deepspeed")
    root, recipe, driver = setup
    reference_losses, reference_windows = uninterrupted
    out = root / "zero3"
    command = two_processes(recipe, driver, out, stage=3) + ["--save_strategy", "steps", "--save_steps", "3"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=dict(LAUNCH_ENV, STEP_DELAY="1.0", WINDOW_LOG=str(root / "windows-zero3-1")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines, workers = [], {}
    for line in process.stdout:
        lines.append(line)
        markers = step_markers(line)
        workers.update({step_rank: pid for _, step_rank, pid in markers})
        if any(step == 5 for step, _, _ in markers) and len(workers) == 2:
            # The workers run in sessions of their own (torch elastic): kill them and the launcher, as a lost node.
            for pid in [*workers.values(), process.pid]:
                os.kill(pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(lines)[-5000:]
    checkpoint, _ = newest_complete_checkpoint(str(out))
    assert checkpoint == str(out / "checkpoint-3")
    assert verify_checkpoint(checkpoint, world_size=2) == []
    assert len(list((out / "checkpoint-3").glob("global_step*/*model_states.pt"))) == 2  # ZeRO-3: parameter shards
    result = run(command + ["--log_level", "info"], WINDOW_LOG=str(root / "windows-zero3-2"))
    assert f"resuming from {checkpoint}" in result.stdout + result.stderr, result.stdout[-6000:]
    assert losses(out) == pytest.approx(reference_losses, rel=1e-5)
    before, after = trained_windows(root / "windows-zero3-1"), trained_windows(root / "windows-zero3-2")
    assert max(before) >= 5  # steps 4 and 5 were trained, then lost with the processes
    assert_windows_continue(before, after, 3, reference_windows)


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
