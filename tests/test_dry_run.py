"""The memory estimate against measured GPU peaks, and `--dry_run true` under every accelerate config."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LAUNCH_ENV
from transformers import Starcoder2Config

from starcoder2_train.benchmarking.child import BenchmarkRecipeParser
from starcoder2_train.configs import RecipeError
from starcoder2_train.model.factory import count_parameters
from starcoder2_train.model.memory import checkpointed_layers_to_fit, estimate_memory_per_gpu
from starcoder2_train.model.presets import MODEL_PRESETS, build_config
from starcoder2_train.recipe import RecipeParser
from starcoder2_train.training.dry_run import memory_plan, parallel_plan, recipe_checkpointed_layers

ROOT = Path(__file__).parents[1]
N_3B = 3_030_371_328
CONFIG_3B = Starcoder2Config(**MODEL_PRESETS["starcoder2-3b"])
PEAKS = json.loads((ROOT / "tests/fixtures/gpu_memory_peaks.json").read_text())
# Cases of this project's path that ran to the end (device_check.py also records baselines and failures).
CASES = [
    (run, case)
    for run in PEAKS["runs"]
    for case in run["cases"]
    if case.get("path", "ours") == "ours" and not case.get("error")
]


def parse_case(case):
    """The case's recipe and words as run_pretrain would parse them (a --model_config trains from scratch)."""
    words = list(case["overrides"]) + ["--dataset_name_or_path", "unused", "--output_dir", "unused"]
    words += ["--report_to", "none"]
    bf16 = "--bf16" in words and words[words.index("--bf16") + 1] == "true"
    if "--bf16" in words:  # the parser refuses bf16 without a GPU; the plan takes it as given
        index = words.index("--bf16")
        del words[index : index + 2]
    if case.get("zero_config") and "--deepspeed" not in words:
        words += ["--deepspeed", case["zero_config"]]
    if "--deepspeed" in words:
        words[words.index("--deepspeed") + 1] = str(ROOT / words[words.index("--deepspeed") + 1])
    recipe = str(ROOT / case["recipe"]) if case["recipe"] else None
    model_args, data_args, training_args = BenchmarkRecipeParser().parse([recipe, *words] if recipe else words)
    config = build_config(model_args, 49152)
    for item in case.get("config_overrides", []):
        key, _, value = item.partition("=")
        setattr(config, key, json.loads(value))
    return config, model_args, data_args, training_args, bf16


@pytest.mark.parametrize("run,case", CASES, ids=[case["name"] for _, case in CASES])
def test_the_estimate_is_within_10_percent_of_each_measured_gpu_peak(run, case):
    config, model_args, data_args, training_args, bf16 = parse_case(case)
    plan = memory_plan(config, model_args, data_args, training_args, bf16=bf16)
    plan.update(num_gpus=case["world_size"], loss_kernel=case["loss_kernel"])
    plan["attn_implementation"] = case.get("attention", plan["attn_implementation"])
    layers = case.get("checkpointed_layers", recipe_checkpointed_layers(config, training_args))
    total = estimate_memory_per_gpu(config, count_parameters(config), checkpointed_layers=layers, **plan)["total"]
    measured = case["peak_allocated_gb"]
    assert abs(total / measured - 1) <= 0.10, f"{case['name']} on {run['device']}: {total:.1f} GB vs {measured} GB"


def estimate(**changes):
    plan = dict(micro_batch_size=2, seq_length=4096, zero_stage=2, num_gpus=1, loss_kernel="liger")
    plan.update(changes)
    return estimate_memory_per_gpu(CONFIG_3B, N_3B, **plan)


def test_model_states_per_zero_stage_and_precision():
    states = lambda r: r["weights"] + r["gradients"] + r["optimizer_states"]  # noqa: E731
    # DeepSpeed bf16, fp32 accumulation: ZeRO-1 (BF16_Optimizer) 2 + 6 + 12/N, ZeRO-2 2 + 16/N, ZeRO-3 18/N + 2 layers
    assert states(estimate(zero_stage=1, num_gpus=8)) == pytest.approx((8 + 12 / 8) * N_3B / 1e9)
    assert states(estimate(zero_stage=2, num_gpus=8)) == pytest.approx((2 + 16 / 8) * N_3B / 1e9)
    layer = 2 * 3072 * 3072 + 2 * 3072 * 256 + 2 * 3072 * 12288  # matmul weights of one 3B layer
    zero3 = states(estimate(zero_stage=3, num_gpus=8))
    assert zero3 == pytest.approx(18 / 8 * N_3B / 1e9 + 2 * 2 * layer / 1e9, rel=0.01)
    # DeepSpeed without bf16: fp32 weights are the master weights; activations twice the bf16 bytes.
    fp32 = estimate(precision="deepspeed_fp32", zero_stage=2, num_gpus=8)
    assert states(fp32) == pytest.approx((4 + 12 / 8) * N_3B / 1e9)
    assert fp32["activations"] == pytest.approx(2 * estimate(zero_stage=2, num_gpus=8)["activations"], rel=0.01)
    # Autocast over fp32 weights with accumulation: 4 + 4 + 8 bytes, plus bf16 copies of the matmul weights.
    autocast = estimate(precision="autocast_fp32", zero_stage=0, gradient_accumulation_steps=2)
    assert states(autocast) == pytest.approx(16 * N_3B / 1e9)
    assert autocast["autocast_copies"] == pytest.approx(2 * N_3B / 1e9, rel=0.02)
    # Without accumulation the Trainer frees the gradients each step: only lm_head's are there at the peak.
    assert estimate(precision="autocast_fp32", zero_stage=0)["gradients"] == pytest.approx(4 * 49152 * 3072 / 1e9)
    offloaded = estimate(zero_stage=3, num_gpus=8, offload_optimizer=True, offload_params=True)
    assert offloaded["optimizer_states"] == 0 and offloaded["cpu_gb"] > 12 * N_3B / 8 / 1e9
    assert offloaded["total"] < estimate(zero_stage=3, num_gpus=8)["total"]


def test_attention_loss_and_checkpointing_change_the_estimate_as_modelled():
    h, i, s, vocab = 3072, 12288, 4096, 49152
    flash = estimate(loss_kernel="cut_cross_entropy")
    # The released 3B config has residual dropout: two 1-byte masks per token and layer.
    per_layer = 2 * 2 * h + 2 * h + 2 * h + 4 * h * (2 / 24) + 2 * h + 2 * h + 4 * i + 2 * h
    assert flash["activations"] == pytest.approx(2 * s * (30 * per_layer + 4 * h + h) / 1e9)
    masked = estimate(attn_implementation="sdpa", loss_kernel="cut_cross_entropy")
    extra = 30 * (2 * s * 4 * h * (1 - 2 / 24) + 2 * 2 * s**2)
    assert masked["activations"] - flash["activations"] == pytest.approx(extra / 1e9)
    # Loss kernels: transformers keeps 12 bytes x vocab per token, chunked one chunk of it, liger no logits.
    plain, chunked, liger = (
        estimate(loss_kernel=k, loss_chunk_size=1024) for k in ("transformers", "chunked", "liger")
    )
    assert plain["loss"] == pytest.approx(12 * vocab * 2 * s / 1e9)
    assert chunked["loss"] == pytest.approx(12 * vocab * 1024 / 1e9)
    assert liger["loss"] < chunked["loss"] < plain["loss"]
    # Every checkpointed layer keeps only its input: the peak falls with each one.
    totals = [estimate(checkpointed_layers=n)["total"] for n in (0, 10, 20, 30)]
    assert totals == sorted(totals, reverse=True)
    with pytest.raises(RecipeError, match="gradient_checkpointing_layers"):
        estimate(checkpointed_layers=31)
    with pytest.raises(RecipeError, match="attn_implementation"):
        estimate(attn_implementation="auto")


def test_auto_checkpoints_the_fewest_layers_that_fit():
    plan = dict(micro_batch_size=2, seq_length=4096, zero_stage=2, num_gpus=1, loss_kernel="liger")
    layers = checkpointed_layers_to_fit(CONFIG_3B, N_3B, 70.0, **plan)
    assert 0 < layers < 30
    assert estimate(checkpointed_layers=layers)["total"] <= 70.0 < estimate(checkpointed_layers=layers - 1)["total"]
    assert checkpointed_layers_to_fit(CONFIG_3B, N_3B, 70.0, **dict(plan, num_gpus=160)) == 0
    assert checkpointed_layers_to_fit(CONFIG_3B, N_3B, 20.0, **plan) is None


def test_the_plan_reads_the_zero_stage_and_offload_from_the_deepspeed_json(monkeypatch, tmp_path):
    words = ["--model_config", "tiny", "--dataset_name_or_path", "x", "--output_dir", str(tmp_path)]
    for stage, name in ((1, "zero1"), (2, "zero2"), (3, "zero3"), (3, "zero3_offload")):
        path = ROOT / f"accelerate_configs/deepspeed/{name}.json"
        *_, training_args = RecipeParser().parse([*words, "--deepspeed", str(path)])
        plan = parallel_plan(training_args, "float32", bf16=True)
        assert (plan["precision"], plan["zero_stage"]) == ("deepspeed_bf16", stage)
        assert plan["offload_optimizer"] == plan["offload_params"] == (name == "zero3_offload")
        assert "gradient accumulation in fp32" in plan["source"]
        assert parallel_plan(training_args, "float32", bf16=False)["precision"] == "deepspeed_fp32"
    # As accelerate launch passes it: only the config file's path in the environment, no ZeRO stage variable.
    *_, training_args = RecipeParser().parse(words)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "accelerate_configs/deepspeed/zero3.json"))
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    assert parallel_plan(training_args, "float32", bf16=True)["zero_stage"] == 3


def test_gradient_checkpointing_layers_takes_a_number_or_auto(tmp_path):
    words = ["--model_config", "tiny", "--dataset_name_or_path", "x", "--output_dir", str(tmp_path)]
    assert RecipeParser().parse([*words, "--gradient_checkpointing_layers", "3"])[2].gradient_checkpointing_layers == 3
    assert RecipeParser().parse([*words, "--gradient_checkpointing_layers", "auto"])[
        2
    ].gradient_checkpointing_layers == ("auto")
    with pytest.raises(RecipeError, match="gradient_checkpointing_layers: must be auto or a number"):
        RecipeParser().parse([*words, "--gradient_checkpointing_layers", "half"])


CONFIGS = sorted(path.name for path in (ROOT / "accelerate_configs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_dry_run_of_the_3b_recipe_under_accelerate_launch_with_every_config(config, tokenizer_dir, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}"]
    command += ["--num_processes", "1", "--num_machines", "1", "scripts/run_pretrain.py"]
    command += ["recipes/starcoder2-3b/pretrain.yaml", "--dry_run", "true", "--tokenizer_name_or_path", tokenizer_dir]
    command += ["--dataset_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    done = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    stage = {"deepspeed_zero1.yaml": 1, "deepspeed_zero2.yaml": 2}.get(config, 3 if "zero3" in config else 0)
    sharding = "FSDP, fully sharded" if config == "fsdp.yaml" else f"ZeRO stage {stage}"
    assert f"memory per GPU ({sharding}, 1 GPU(s))" in out, out[-2000:]
    assert "parameters: 3,030,371,328" in out
    plan = next(line for line in out.splitlines() if line.startswith("plan: "))
    expected = {"ddp.yaml": "autocast_fp32", "fsdp.yaml": "fsdp_bf16"}.get(config, "deepspeed_bf16")
    assert f"precision {expected}" in plan, plan
    assert "checkpointed layers" in plan and "(auto)" in plan
    assert ("fits: peak" in out) != ("does not fit" in out)
    assert "of the training time between two evaluations (goal <= 2%)" in out  # run.py gives the FIM budget
    assert not (tmp_path / "o").exists()


def test_a_dry_run_without_a_gpu_plans_with_the_recipes_bf16(tmp_path, capsys):
    """The parser drops bf16 where no GPU is (transformers refuses it); the plan, `auto` included, keeps it."""
    from starcoder2_train.training.dry_run import print_dry_run

    parser = RecipeParser()
    words = [str(ROOT / "recipes/starcoder2-3b/pretrain.yaml"), "--dry_run", "true", "--output_dir", str(tmp_path)]
    words += ["--deepspeed", str(ROOT / "accelerate_configs/deepspeed/zero2.json"), "--dataset_name_or_path", "x"]
    model_args, data_args, training_args = parser.parse(words + ["--loss_kernel", "chunked"])
    assert parser.dry_run_bf16 is True and not training_args.bf16
    config = build_config(model_args, 49152)
    result = print_dry_run(config, model_args, data_args, training_args, "sdpa_varlen", bf16=parser.dry_run_bf16)
    assert result["plan"]["precision"] == "deepspeed_bf16"
    plan = dict(result["plan"])
    expected = checkpointed_layers_to_fit(config, result["parameters"], 0.92 * 80, **plan)
    assert result["checkpointed_layers"] == expected > 0
    assert f"checkpointed layers {expected} of 30 (auto)" in capsys.readouterr().out


def test_a_muon_dry_run_plans_one_moment_for_the_layers_matrices(tmp_path, capsys):
    """muon: true keeps one fp32 momentum buffer per weight matrix of the layers, not Adam's two moments."""
    from starcoder2_train.training.dry_run import print_dry_run

    words = [str(ROOT / "recipes/starcoder2-3b/pretrain.yaml"), "--dry_run", "true", "--output_dir", str(tmp_path)]
    words += ["--dataset_name_or_path", "x", "--loss_kernel", "chunked"]
    planned = {}
    for muon in ("false", "true"):
        parser = RecipeParser()
        model_args, data_args, training_args = parser.parse(words + ["--muon", muon])
        config = build_config(model_args, 49152)
        result = print_dry_run(config, model_args, data_args, training_args, "sdpa_varlen", bf16=parser.dry_run_bf16)
        planned[muon] = result["memory_gb"]
    layer = 2 * 3072 * 3072 + 2 * 3072 * 256 + 2 * 3072 * 12288  # matmul weights of one 3B layer
    saved = planned["false"]["optimizer_states"] - planned["true"]["optimizer_states"]
    assert saved == pytest.approx(4 * 30 * layer / 1e9)
    assert planned["true"]["total"] < planned["false"]["total"]


@pytest.mark.parametrize(
    ("recipe", "world_size", "expected"),
    [("starcoder2-3b/pretrain.yaml", 160, 0.0016), ("starcoder2-15b/pretrain.yaml", 512, 0.0016)],
)
def test_the_dry_run_prints_the_evaluations_share_of_training_time(recipe, world_size, expected, tmp_path, capsys):
    """Forward tokens of the evaluation per rank over 3 x the training tokens per rank between two evaluations
    (training/evaluation_cost.py), as each StarCoder2 recipe's comment states it; at most 2%."""
    from starcoder2_train.training.dry_run import print_dry_run

    words = [str(ROOT / "recipes" / recipe), "--dry_run", "true", "--dry_run_world_size", str(world_size)]
    words += ["--output_dir", str(tmp_path), "--dataset_name_or_path", "x", "--loss_kernel", "chunked"]
    parser = RecipeParser()
    model_args, data_args, training_args = parser.parse(words)
    config = build_config(model_args, 49152)
    result = print_dry_run(config, model_args, data_args, training_args, "sdpa", parser.dry_run_bf16, fim_budget=64)
    languages = len(data_args.languages or ()) or training_args.eval_languages  # 17, or 32 of the 15B's many
    problems = training_args.fim_eval_problems
    forward = (2_000_000 * languages + 4096 * 4096 + problems * (4096 - 64)) / world_size
    forward += math.ceil(math.ceil(problems / world_size) / training_args.per_device_eval_batch_size) * 64 * 128
    by_hand = forward / (3 * 5000 * result["tokens_per_step"] / world_size)
    assert result["evaluation_share"] == pytest.approx(by_hand) and round(by_hand, 4) == expected
    assert f"= {by_hand:.2%} of the training time between two evaluations (goal <= 2%)" in capsys.readouterr().out
