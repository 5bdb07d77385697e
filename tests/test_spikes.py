"""Spikes rolled back (training/spikes.py): the rule, the one-step-late judgement that never lets a checkpoint
follow an unjudged step, the recipe keys refused by name, and real runs in which a test-only driver injects a
spike: the run stops without saving, records it, writes the windows of the spike's step to skipped_windows.json
and exits 76; the same command resumes from the checkpoint before the spike and never trains those windows; after
max_rollbacks the run stops with one error line."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import LAUNCH_ENV, random_repositories, write_repository_shards
from transformers import TrainerControl, TrainerState

from starcoder2_train.configs import RecipeError
from starcoder2_train.training.spikes import ROLLBACK_EXIT_CODE, ROLLBACKS_FILE, SpikeMonitor, judge

ROOT = Path(__file__).parents[1]
ARGS = SimpleNamespace(world_size=1, process_index=0, output_dir="/nonexistent")  # one process, no rollbacks yet

# With SPIKE_STEP=N, the loss of every micro batch of optimizer step N (on SPIKE_RANK alone, when set) becomes
# NaN (the backward then writes NaN into the weights, as a real overflow would) and the identities (sha1 of
# input_ids) of those windows go to BAD_WINDOWS; any later run that meets one of them spikes again on it. With
# WINDOW_LOG, every window trained is appended with its step to WINDOW_LOG.<rank>.
DRIVER = """
import hashlib, importlib.util, json, os, sys
import starcoder2_train.training.trainer as trainer_module
from starcoder2_train.cli import run_script

SPIKE_STEP, BAD = os.environ.get("SPIKE_STEP"), os.environ["BAD_WINDOWS"]
SPIKE_RANK = os.environ.get("SPIKE_RANK")  # only this rank's loss becomes NaN (unset: every rank's)
WINDOW_LOG = os.environ.get("WINDOW_LOG")

compute_loss = trainer_module.PretrainingTrainer.compute_loss
def spiking_compute_loss(self, model, inputs, *args, **kwargs):
    rows = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in inputs["input_ids"].cpu()]
    step = self.state.global_step + 1
    bad = set(json.load(open(BAD))) if os.path.exists(BAD) else set()
    if WINDOW_LOG:
        with open(f"{WINDOW_LOG}.{self.args.process_index}", "a") as handle:
            handle.write(json.dumps({"step": step, "windows": rows}) + "\\n")
    loss = compute_loss(self, model, inputs, *args, **kwargs)
    if SPIKE_STEP and step == int(SPIKE_STEP) and SPIKE_RANK in (None, str(self.args.process_index)):
        json.dump(sorted(bad | set(rows)), open(BAD, "w"))
        return loss * float("nan")
    return loss * float("nan") if bad & set(rows) else loss
trainer_module.PretrainingTrainer.compute_loss = spiking_compute_loss

spec = importlib.util.spec_from_file_location("run_pretrain", os.path.join("scripts", "run_pretrain.py"))
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
run_script(lambda: module.main(sys.argv[1:]))  # as scripts/run_pretrain.py's __main__: one error line
"""


# -- the rule and the judgement, in process ----------------------------------------------------------------------


def test_judge_non_finite_and_median_rule():
    assert judge(float("nan"), False, [], 2.0, 3) == "a non-finite loss or gradient norm"
    assert judge(1.0, True, [], 2.0, 3) == "a non-finite loss or gradient norm"  # another rank's NaN
    assert judge(100.0, False, [1.0, 1.0], 2.0, 3) is None  # the window is not full yet
    assert judge(2.5, False, [1.0, 1.2, 5.0], 2.0, 3) is not None  # the median (1.2) sets the bar, not the mean
    assert "median of the last 3 steps" in judge(2.5, False, [1.0, 1.2, 1.1], 2.0, 3)
    assert judge(2.1, False, [1.0, 1.2, 1.1], 2.0, 3) is None


def steps(monitor, losses, save_at=(), stop_at=None, micro_batches=2):
    """Feed `monitor` one step per loss (each split over `micro_batches`); returns the controls at each step end."""
    args, state, controls = ARGS, TrainerState(), []
    monitor.on_train_begin(args, state, TrainerControl())
    for step, loss in enumerate(losses, start=1):
        for _ in range(micro_batches):
            monitor.add_loss(torch.tensor(loss / micro_batches))
        monitor.set_grad_norm(torch.tensor(1.0))
        state.global_step = step
        control = TrainerControl(should_save=step in save_at, should_training_stop=step == stop_at)
        controls.append(monitor.on_step_end(args, state, control))
        if monitor.spike is not None:
            break
    return controls


def test_a_step_is_judged_a_step_late_and_at_once_before_a_save():
    monitor = SpikeMonitor(factor=2.0, window=2, skip_steps=1, max_rollbacks=1)
    controls = steps(monitor, [3.0, 3.0, 3.0, 30.0, 3.0, 3.0])
    assert monitor.spike["step"] == 4 and len(controls) == 5  # step 4's loss read at step 5's end: no host wait
    assert "median of the last 2 steps" in monitor.spike["reason"] and monitor.spike["loss"] == pytest.approx(30.0)
    assert controls[-1].should_training_stop and not controls[-1].should_save

    monitor = SpikeMonitor(factor=2.0, window=2, skip_steps=1, max_rollbacks=1)
    controls = steps(monitor, [3.0, 3.0, 3.0, 30.0, 3.0], save_at={4})
    assert monitor.spike["step"] == 4 and len(controls) == 4  # judged at once: the save of step 4 is vetoed
    assert not controls[-1].should_save and controls[-1].should_training_stop


def test_grad_norm_none_and_float_and_history_kept_in_checkpoints():
    monitor = SpikeMonitor(factor=2.0, window=3, skip_steps=1, max_rollbacks=1)
    steps(monitor, [4.0, 3.0, 2.0], stop_at=3)
    assert monitor.spike is None and list(monitor.history) == [4.0, 3.0, 2.0]
    resumed = SpikeMonitor(factor=2.0, window=3, skip_steps=1, max_rollbacks=1)
    state = TrainerState(stateful_callbacks={"SpikeMonitor": monitor.state()})
    resumed.on_train_begin(SimpleNamespace(), state, TrainerControl())
    assert list(resumed.history) == [4.0, 3.0, 2.0]
    resumed.add_loss(torch.tensor(1.0))
    resumed.set_grad_norm(float("inf"))  # DeepSpeed's norm is a float
    state.global_step = 4
    resumed.on_step_end(ARGS, state, TrainerControl(True, True))
    assert resumed.spike["step"] == 4 and resumed.spike["reason"] == "a non-finite loss or gradient norm"


def test_the_last_step_is_judged_when_training_ends():
    monitor = SpikeMonitor(factor=2.0, window=2, skip_steps=1, max_rollbacks=1)
    steps(monitor, [3.0, 3.0, float("nan")])  # the data ran out: no step said should_training_stop
    assert monitor.spike is None
    control = monitor.on_train_end(ARGS, TrainerState(), TrainerControl())
    assert monitor.spike["step"] == 3 and not control.should_save


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the judgement's host wait is a GPU matter")
def test_a_step_end_does_not_wait_for_the_gpu_but_a_save_step_does():
    """Step 1's values are copied behind an event; at step 2's end the GPU is still busy with ~1 s of step 2's
    work, and judging step 1 does not wait for it. A saving step 3 is judged at once: it waits."""
    import time

    monitor = SpikeMonitor(factor=2.0, window=2, skip_steps=1, max_rollbacks=1)
    args, state = ARGS, TrainerState()
    monitor.on_train_begin(args, state, TrainerControl())
    elapsed = []
    for step in (1, 2, 3):
        if step > 1:
            torch.cuda._sleep(2_000_000_000)  # about 1 s of this step's GPU work, queued before its loss
        monitor.add_loss(torch.ones((), device="cuda"))
        monitor.set_grad_norm(torch.ones((), device="cuda"))
        state.global_step = step
        start = time.perf_counter()
        monitor.on_step_end(args, state, TrainerControl(should_save=step == 3))
        elapsed.append(time.perf_counter() - start)
        if step == 1:
            torch.cuda.synchronize()  # step 1's GPU work done before step 2's is queued, as in a running loop
    assert elapsed[1] < 0.25 < elapsed[2], elapsed
    assert list(monitor.history) == [1.0, 1.0] and monitor.spike is None


@pytest.mark.parametrize(
    "key, value", [("spike_factor", 1.0), ("spike_window", 0), ("spike_skip_steps", 0), ("max_rollbacks", -1)]
)
def test_spike_keys_refused_by_name(tmp_path, key, value):
    from starcoder2_train.configs.training_arguments import PretrainingArguments

    with pytest.raises(RecipeError, match=f"^{key}: must be"):
        PretrainingArguments(output_dir=str(tmp_path), use_cpu=True, spike_detection=True, **{key: value})


# -- real runs ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    """A saved starting model, shards and a recipe of 8 steps of 4 windows, saving every 2 steps, spikes judged."""
    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.model.factory import create_model

    root = tmp_path_factory.mktemp("spikes")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    model.save_pretrained(root / "start")
    tokenizer.save_pretrained(root / "start")
    shards = write_repository_shards(root / "shards", random_repositories(80, seed=43), num_files=1)
    values = dict(
        model_name_or_path=str(root / "start"), torch_dtype="float32", attn_implementation="sdpa",
        dataset_name_or_path=shards, seq_length=64, max_steps=8, learning_rate=3e-3, warmup_steps=1,
        logging_steps=1, save_strategy="steps", save_steps=2, report_to="none", seed=5, bf16=False,
        disable_tqdm=True, dataloader_num_workers=0, spike_detection=True, spike_window=4,
        spike_factor=3.0, max_rollbacks=1,
    )  # fmt: skip
    recipe = root / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    return root, recipe, driver


def launch(setup, out: Path, *extra, processes: int = 1, **env) -> subprocess.CompletedProcess:
    """One process (4 windows a step), or `processes` under ZeRO-2 (2 windows each a step)."""
    root, recipe, driver = setup
    if processes == 1:
        command = [sys.executable, str(driver), str(recipe), "--per_device_train_batch_size", "4", "--use_cpu", "true"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += ["accelerate_configs/deepspeed_zero2.yaml", "--num_processes", str(processes)]
        command += ["--main_process_port", "0", str(driver), str(recipe), "--per_device_train_batch_size", "2"]
    command += ["--output_dir", str(out), *extra]
    env = dict(LAUNCH_ENV, BAD_WINDOWS=str(out.parent / f"{out.name}-bad.json"), **env)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def windows(log: Path) -> dict[int, list[str]]:
    """Step -> the identities of the windows every rank trained at that step (sorted)."""
    by_step: dict[int, list[str]] = {}
    for path in sorted(log.parent.glob(f"{log.name}.*")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_step.setdefault(record["step"], []).extend(record["windows"])
    return {step: sorted(rows) for step, rows in by_step.items()}


@pytest.mark.slow
def test_spike_rolled_back_and_its_windows_skipped(setup):
    root = setup[0]
    reference = launch(setup, root / "reference", WINDOW_LOG=str(root / "reference.jsonl"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = windows(root / "reference.jsonl")

    out = root / "run"
    first = launch(setup, out, SPIKE_STEP="5", WINDOW_LOG=str(root / "first.jsonl"))
    output = first.stdout + first.stderr
    assert first.returncode == ROLLBACK_EXIT_CODE, output[-3000:]
    # Step 5's loss is read at step 6's end, which saves: judged at once, and checkpoint-6 never written.
    assert "spike: step 5: a non-finite loss or gradient norm" in output
    assert "spike: rollback 1 of at most 1: step 5" in output and "checkpoint-4" in output
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (event,) = json.loads((out / ROLLBACKS_FILE).read_text())["rollbacks"]
    assert event["step"] == 5 and event["checkpoint"].endswith("checkpoint-4") and event["skipped_steps"] == [5, 5]
    assert event["windows"] == [[16, 20]]  # step 5 of 4 windows a step: global windows 16..19
    assert json.loads((out / "skipped_windows.json").read_text())["ranges"] == [[16, 20]]

    second = launch(setup, out, WINDOW_LOG=str(root / "second.jsonl"))
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    resumed = windows(root / "second.jsonl")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert expected[5] == windows(root / "first.jsonl")[5]  # the spiked step's windows, trained nowhere after
    for step in (5, 6, 7):  # each step after the rollback trains the next step's windows of the run left alone
        assert resumed[step] == expected[step + 1]
    assert not set(expected[5]) & {row for rows in resumed.values() for row in rows}
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry and entry["step"] > 4]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # finite after the rollback (NaN != NaN)


@pytest.mark.slow
def test_stop_after_max_rollbacks_and_go_on_with_a_higher_bound(setup):
    out = setup[0] / "stopped"
    result = launch(setup, out, "--max_rollbacks", "0", SPIKE_STEP="3")
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "spike_detection: step 3" in error[0] and "max_rollbacks: 0" in error[0], result.stderr
    assert "Traceback" not in result.stderr
    (event,) = json.loads((out / ROLLBACKS_FILE).read_text())["rollbacks"]
    assert event["step"] == 3 and event["stopped"] and not (out / "skipped_windows.json").exists()
    # max_rollbacks raised: the same windows spike again at step 3, and this time they are rolled back and skipped
    again = launch(setup, out, "--max_rollbacks", "1")
    assert again.returncode == ROLLBACK_EXIT_CODE, (again.stdout + again.stderr)[-3000:]
    assert "spike: rollback 1 of at most 1: step 3" in again.stdout + again.stderr
    assert json.loads((out / "skipped_windows.json").read_text())["ranges"] == [[8, 12]]


@pytest.mark.slow
def test_spike_on_one_rank_rolled_back_by_both_under_zero2(setup):
    """2 processes, ZeRO-2: rank 1 alone sees a NaN at step 3; both stop at the same step and exit 0 under the
    launcher, the requeue file (which scripts/slurm/train.sbatch checks) saying why."""
    root = setup[0]
    out, requeue = root / "zero2", root / "zero2-requeue.json"
    env = dict(SPIKE_STEP="3", SPIKE_RANK="1", STARCODER2_REQUEUE_FILE=str(requeue))
    first = launch(setup, out, processes=2, WINDOW_LOG=str(root / "zero2-first.jsonl"), **env)
    output = first.stdout + first.stderr
    assert first.returncode == 0 and "spike: step 3: a non-finite loss or gradient norm" in output, output[-3000:]
    assert "ChildFailedError" not in output  # the ranks exit 0 under the launcher: the requeue file says why
    assert "rollback 1 of at most 1: step 3" in output  # the gradient norm is inf on both ranks (DeepSpeed's)
    assert json.loads(requeue.read_text())["reason"] == "spike rollback"
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]
    (event,) = json.loads((out / ROLLBACKS_FILE).read_text())["rollbacks"]
    assert event["step"] == 3 and event["windows"] == [[8, 12]]  # 2 ranks x 2 windows a step: step 3 is 8..11
    spiked = set(windows(root / "zero2-first.jsonl")[3])

    second = launch(setup, out, processes=2, WINDOW_LOG=str(root / "zero2-second.jsonl"))
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    resumed = windows(root / "zero2-second.jsonl")
    assert sorted(resumed) == [3, 4, 5, 6, 7, 8] and all(len(rows) == 4 for rows in resumed.values())
    assert len(spiked) == 4 and not spiked & {row for rows in resumed.values() for row in rows}
