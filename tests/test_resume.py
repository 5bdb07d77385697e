"""Resume anywhere: the data position recorded in each checkpoint (training/data_position.py), the
sampler that starts there without walking, `skipped_windows`, the recipe check that lets a world-size change
through and refuses a changed global batch, and DeepSpeed's universal checkpoint for another world size
(training/reshard.py).

The slow tests chain real runs, 8 steps of test_preemption's recipe, each resumed on the other number of processes
(1 -> 2 -> 1, or 2 -> 1 -> 2): run A saves checkpoint-4, B resumes it and saves checkpoint-6, C resumes that; the
windows of steps 1-4 (A), 5-6 (B) and 7-8 (C) must be the uninterrupted 1-process run's, step by step, and the
losses C's trainer_state holds equal its losses within rel 1e-5. One uninterrupted reference a recipe, shared.
DDP with and without a mixture, ZeRO-1 with the mixture, ZeRO-2 and ZeRO-3 (DeepSpeed's universal conversion
works for stage 3 on the CPU; its load needed the repair in reshard.py). Times on the 2-core box: 18-25 s each when
quiet, 65-135 s when loaded.
"""

import json
import sys

import pytest
from test_preemption import ROOT, losses, run, setup, trained_windows  # noqa: F401 - setup is a fixture

from starcoder2_train.configs import RecipeError
from starcoder2_train.training.data_position import (
    DATA_POSITION,
    DataPosition,
    WindowSampler,
    advance,
    merge_ranges,
    read_skipped_windows,
    windows_of_steps,
    write_skipped_windows,
)

# -- The position and the sampler (fast) ------------------------------------------------------------------------


def test_the_sampler_starts_at_the_position_and_jumps_over_skipped_ranges():
    skipped = merge_ranges([(10, 12), (5, 7), (7, 8), (20, 20)])
    assert skipped == [(5, 8), (10, 12)]
    sampler = WindowSampler(16, start=3, skipped=skipped)
    assert len(sampler) == 16 - 5  # a whole pass, as the uninterrupted run's
    assert list(sampler) == [3, 4, 8, 9, 12, 13, 14, 15]
    assert list(sampler)[:3] == [0, 1, 2]  # a later pass starts at 0
    assert advance(3, 4, skipped) == 12 and advance(0, 5, skipped) == 8 and advance(0, 4, skipped) == 4
    position = {"global_step": 2, "windows_per_step": 4, "next_window": 9, "skipped_windows": skipped}
    assert windows_of_steps(position, 3, 4) == [(9, 10), (12, 19)]  # 8 windows over the skipped 10-11


def test_resuming_deep_into_a_run_costs_no_walk():
    sampler = WindowSampler(10**15, start=10**15 - 3, skipped=[(10**15 - 2, 10**15 - 1)])
    assert list(iter(sampler)) == [10**15 - 3, 10**15 - 1]  # list(sampler) would preallocate len()


class Args:
    def __init__(self, world_size=1, batch=4, accumulation=1, output_dir="."):
        self.world_size, self.per_device_train_batch_size = world_size, batch
        self.gradient_accumulation_steps, self.output_dir = accumulation, output_dir


def test_every_world_size_trains_the_same_windows_per_step_from_the_position():
    """accelerate's BatchSamplerShard over the sampler: rank r takes micro-batches r, r + W, ...; each step's
    windows (all ranks, all accumulation) are the same set for 1 x 4 x 1, 2 x 2 x 1, 2 x 1 x 2 and 4 x 1 x 1."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    def steps(world, batch, accumulation, start):
        per_rank = []
        for rank in range(world):
            shard = BatchSamplerShard(BatchSampler(WindowSampler(64, start, [(20, 23)]), batch, False), world, rank)
            per_rank.append(list(shard))
        step_batches = [[b for rank in per_rank for b in rank[s * accumulation : (s + 1) * accumulation]]
                        for s in range(len(per_rank[0]) // accumulation)]  # fmt: skip
        return [sorted(i for batch_ in batches for i in batch_) for batches in step_batches][:5]

    position = DataPosition(Args(), skipped=[(20, 23)])
    start = position.next_window(3)  # the position after 3 steps of 4 windows
    assert start == 12
    reference = steps(1, 4, 1, start)
    for world, batch, accumulation in [(2, 2, 1), (2, 1, 2), (4, 1, 1)]:
        assert steps(world, batch, accumulation, start) == reference
    assert reference[2] == [23, 24, 25, 26] and 20 not in sum(reference, [])


def test_the_checkpoint_records_the_position_and_a_resume_reads_it(tmp_path):
    checkpoint = tmp_path / "checkpoint-6"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    written = DataPosition(Args(world_size=2, batch=2), skipped=[(4, 6)])
    written.start, written.start_step = 8, 2  # resumed at step 2, position 8
    record = written.record(6)
    assert record["next_window"] == 24 and record["world_size"] == 2 and record["skipped_windows"] == [[4, 6]]
    (checkpoint / DATA_POSITION).write_text(json.dumps(record))
    resumed = DataPosition(Args(world_size=1, batch=2, accumulation=2))
    resumed.resume(str(checkpoint))
    assert (resumed.start, resumed.start_step, resumed.skipped) == (24, 6, [(4, 6)])
    (checkpoint / DATA_POSITION).unlink()  # a checkpoint written before: global_step x windows per step
    legacy = DataPosition(Args(world_size=1, batch=4))
    legacy.resume(str(checkpoint))
    assert legacy.start == 24


def test_the_data_is_built_for_max_steps_plus_the_skipped_windows(tmp_path):
    from starcoder2_train.training.data_position import data_arguments_for_skips

    args = Args(world_size=2, batch=2, output_dir=str(tmp_path))
    args.max_steps = 10
    assert data_arguments_for_skips(args) is args
    write_skipped_windows(str(tmp_path), [(8, 13)])  # 5 windows: 2 more steps of 4 (rounded up)
    widened = data_arguments_for_skips(args)
    assert (widened.max_steps, args.max_steps) == (12, 10)
    assert len(WindowSampler(widened.max_steps * 4, 0, [(8, 13)])) >= args.max_steps * 4


def test_skipped_windows_file_merges_and_refuses_a_bad_one(tmp_path):
    assert read_skipped_windows(str(tmp_path)) == []
    write_skipped_windows(str(tmp_path), [(8, 12)], reason={"steps": [3, 3], "why": "spike"})
    assert write_skipped_windows(str(tmp_path), [(12, 16), (0, 2)]) == [(0, 2), (8, 16)]
    saved = json.loads((tmp_path / "skipped_windows.json").read_text())
    assert saved["reasons"] == [{"steps": [3, 3], "why": "spike"}]
    (tmp_path / "skipped_windows.json").write_text('{"windows": [1, 2]}')
    with pytest.raises(RecipeError, match="skipped_windows.json: expected"):
        read_skipped_windows(str(tmp_path))


# -- The recipe check at a resume (fast) ------------------------------------------------------------------------


def test_the_recipe_check_lets_a_world_size_change_through_and_nothing_else():
    from starcoder2_train.configs import DataArguments, ModelArguments, PretrainingArguments
    from starcoder2_train.training.checkpoints import _mismatch, recipe_differences, run_recipe

    def recipe(**training):
        values = dict(output_dir="out", per_device_train_batch_size=4, learning_rate=3e-3, use_cpu=True)
        args = PretrainingArguments(**{**values, **training})
        data = DataArguments(dataset_name_or_path="d", seq_length=64)
        return run_recipe(ModelArguments(model_config="test"), data, args, {})

    saved = recipe()
    # 2 processes x 2 (world_size is read from the process group: a stand-in with the same arithmetic)
    assert recipe(per_device_train_batch_size=2, gradient_accumulation_steps=2) == saved
    assert recipe_differences(saved, recipe(max_steps=100, logging_steps=3, dataloader_num_workers=2)) == []
    assert recipe_differences(saved, recipe(per_device_train_batch_size=2)) == ["windows_per_step"]
    assert recipe_differences(saved, recipe(learning_rate=1e-3, warmup_steps=5)) == ["learning_rate", "warmup_steps"]
    message = str(_mismatch("output_dir out holds a run that", saved, recipe(per_device_train_batch_size=8),
                            ["windows_per_step"]))  # fmt: skip
    assert "windows_per_step: 4 there, 8 now" in message and "gradient_accumulation_steps" in message
    older = {key: value for key, value in saved.items() if key != "training"}  # written before 211e9c3
    assert recipe_differences(older, recipe(learning_rate=1e-3)) == []


def test_a_checkpoint_of_another_engine_is_refused_by_name(tmp_path):
    from starcoder2_train.training.reshard import prepare_resharded_load, saved_world_size

    class Trainer:
        is_deepspeed_enabled = is_fsdp_enabled = False
        args = Args()
        args.save_only_model = False

    (tmp_path / "latest").write_text("global_step4")
    (tmp_path / "rng_state_0.pth").write_text("x")
    (tmp_path / "rng_state_1.pth").write_text("x")
    assert saved_world_size(str(tmp_path)) == 2
    with pytest.raises(RecipeError, match="was written by DeepSpeed .*global_step4"):
        prepare_resharded_load(Trainer(), str(tmp_path))
    (tmp_path / "latest").unlink()
    fsdp = Trainer()
    fsdp.is_fsdp_enabled = True
    prepare_resharded_load(fsdp, str(tmp_path))  # DCP folders: torch.distributed.checkpoint reshards at load
    (tmp_path / "pytorch_model_fsdp_0_rank0.bin").write_text("x")
    with pytest.raises(RecipeError, match="FSDP shards saved per rank .* load on 2 processes only"):
        prepare_resharded_load(fsdp, str(tmp_path))


# -- Real runs (slow) -------------------------------------------------------------------------------------------


def one_process(recipe, driver, out, deepspeed_stage=None) -> list[str]:
    if deepspeed_stage is None:
        command = [sys.executable, str(driver), str(recipe), "--use_cpu", "true"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += [f"accelerate_configs/deepspeed_zero{deepspeed_stage}.yaml", "--num_processes", "1"]
        command += ["--main_process_port", "0", str(driver), str(recipe)]
    return command + ["--per_device_train_batch_size", "4", "--output_dir", str(out)]


def two_processes(recipe, driver, out, deepspeed_stage=None) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if deepspeed_stage is None:  # DDP over gloo
        command += ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
        command += [str(driver), str(recipe), "--use_cpu", "true"]
    else:
        command += ["--config_file", f"accelerate_configs/deepspeed_zero{deepspeed_stage}.yaml", "--num_processes"]
        command += ["2", "--main_process_port", "0", str(driver), str(recipe)]
    # 2 processes x 1 window x 2 accumulation steps: the global batch of 1 x 4 x 1
    return command + ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--output_dir",
                      str(out)]  # fmt: skip


# Every 2 steps in every run (a resumed run saves at its own recipe's save_steps: trainer._RecipeIntervals).
SAVES = ["--save_total_limit", "5", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.fixture(scope="module")
def recipes(setup):  # noqa: F811 - test_preemption's fixture
    """The plain recipe and a mixture of two repository sources (70/30), 8 steps each."""
    from conftest import random_repositories, write_repository_shards

    root, recipe, driver = setup
    second = write_repository_shards(root / "second", random_repositories(40, seed=9), num_files=1)
    first = json.loads(next(line for line in recipe.read_text().splitlines() if line.startswith("dataset_name"))
                       .split(": ", 1)[1])  # fmt: skip
    mixture = [
        {"dataset_name_or_path": first, "weight": 0.7, "name": "a"},
        {"dataset_name_or_path": second, "weight": 0.3, "name": "b"},
    ]
    lines = [line for line in recipe.read_text().splitlines() if not line.startswith("dataset_name")]
    mixed = root / "mixture.yaml"
    mixed.write_text("\n".join(lines + [f"dataset_mixture: {json.dumps(mixture)}"]) + "\n")
    return {"plain": recipe, "mixture": mixed}, driver, root


def reference(recipes, kind: str):
    """The uninterrupted 1-process run of `kind` (saving checkpoint-4 on the way: the start of the 1 -> 2 chains)."""
    paths, driver, root = recipes
    out = root / f"reference-{kind}"
    if not (out / "trainer_state.json").exists():
        command = one_process(paths[kind], driver, out) + SAVES
        run(command, WINDOW_LOG=str(root / f"windows-reference-{kind}"))
    windows = trained_windows(root / f"windows-reference-{kind}")
    assert sorted(windows) == list(range(1, 9)) and all(len(rows) == 4 for rows in windows.values())
    return losses(out), windows, out


def chain(recipes, kind: str, name: str, first, launches):
    """`first`: (command, output_dir) of a run to step 8 that saved checkpoint-4, or None for the reference's;
    then each launch resumes the previous run's checkpoint (4, then 6) in a new output_dir. Returns the windows
    trained at each step by the run that trained it, the last output_dir and the output of every launch."""
    paths, driver, root = recipes
    reference_losses, reference_windows, reference_dir = reference(recipes, kind)
    histories, outputs = {}, []
    if first is None:
        previous = reference_dir
        histories.update({step: rows for step, rows in reference_windows.items() if step <= 4})
    else:
        command, previous = first
        log = root / f"windows-{name}-0"
        outputs.append(run(command + SAVES, WINDOW_LOG=str(log)))
        histories.update({step: rows for step, rows in trained_windows(log).items() if step <= 4})
        assert trained_windows(log) == reference_windows  # the 2-process run never stopped: the same windows
    for number, (launch, resumed_at) in enumerate(zip(launches, (4, 6)), start=1):
        out, log = root / f"{name}-{number}", root / f"windows-{name}-{number}"
        command = launch(paths[kind], driver, out) + SAVES + ["--log_level", "info"]
        command += ["--resume_from_checkpoint", str(previous / f"checkpoint-{resumed_at}")]
        outputs.append(run(command, WINDOW_LOG=str(log)))
        trained = trained_windows(log)
        assert min(trained) == resumed_at + 1, sorted(trained)
        histories.update({step: rows for step, rows in trained.items() if step <= resumed_at + 2})
        previous = out
    assert histories == reference_windows  # none twice, none missed, each at its step
    every = [window for rows in histories.values() for window in rows]
    assert len(every) == len(set(every)) == 32
    assert losses(previous) == pytest.approx(reference_losses, rel=1e-5) and len(reference_losses) == 8
    return previous, outputs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "mixture"])
def test_ddp_one_to_two_to_one_process_continues_exactly(recipes, kind):
    with_workers = lambda *a: one_process(*a) + ["--dataloader_num_workers", "2"]  # noqa: E731 - workers fetch only
    last, outputs = chain(recipes, kind, f"ddp-{kind}", None, [two_processes, with_workers])
    text = "".join(result.stdout + result.stderr for result in outputs)
    assert text.count("the sampler starts there, nothing walked") == 2  # logged by the main process
    position = json.loads((last / "checkpoint-8" / DATA_POSITION).read_text())
    assert position["next_window"] == 32 and position["world_size"] == 1
    if kind == "mixture":
        assert sum(position["sources"].values()) == 32 and set(position["sources"]) == {"a", "b"}


@pytest.mark.slow
@pytest.mark.parametrize("stage,kind", [(1, "mixture"), (2, "plain"), (3, "plain")])
def test_zero_two_to_one_to_two_processes_continues_through_the_universal_checkpoint(recipes, stage, kind):
    pytest.importorskip("deepspeed")
    paths, driver, root = recipes
    first = root / f"zero{stage}-0"
    last, outputs = chain(
        recipes, kind, f"zero{stage}", (two_processes(paths[kind], driver, first, stage), first),
        [lambda *a: one_process(*a, deepspeed_stage=stage), lambda *a: two_processes(*a, deepspeed_stage=stage)],
    )  # fmt: skip
    text = "".join(result.stdout + result.stderr for result in outputs)
    assert "converting it to DeepSpeed's universal checkpoint" in text
    assert (first / "checkpoint-4" / "latest_universal").read_text() == "global_step4_universal"
    if kind == "mixture":  # the per-source position carried through both world-size changes
        position = json.loads((last / "checkpoint-8" / DATA_POSITION).read_text())
        assert sum(position["sources"].values()) == 32 and set(position["sources"]) == {"a", "b"}
    if stage == 3:  # DeepSpeed 0.19.8 shared one Adam step across sub-groups after a universal load (reshard.py)
        import torch

        for shard in (last / "checkpoint-8" / "global_step8").glob("*optim_states.pt"):
            state = torch.load(shard, weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]["state"]
            assert [float(entry["step"]) for entry in state.values()] == [8.0] * len(state)
