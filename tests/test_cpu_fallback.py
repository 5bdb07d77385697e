"""A GPU recipe on a machine without a CUDA GPU (training/cpu_fallback.py): every shipped recipe parses and runs with
one line saying what changed, or is refused by key before any work; never a library's traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import LAUNCH_ENV

from starcoder2_train.configs import RecipeError
from starcoder2_train.recipe import RecipeParser
from starcoder2_train.training import cpu_fallback
from starcoder2_train.training.cpu_fallback import NOTICE_PREFIX, fit_to_machine

ROOT = Path(__file__).parents[1]
RECIPES = ROOT / "recipes"
GPU_RECIPES = sorted(
    str(path.relative_to(ROOT)) for path in RECIPES.glob("starcoder2-*/*.yaml") if path.name != "sft_lora.yaml"
)
SFT_RECIPE = "recipes/starcoder2-3b/sft_lora.yaml"


def recipe_values(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture
def cpu(monkeypatch):
    """This machine as one without CUDA or NVIDIA GPUs (it is one; the patches make the tests say so anywhere)."""
    monkeypatch.setattr(cpu_fallback, "cuda_available", lambda: False)
    monkeypatch.setattr(cpu_fallback, "hidden_nvidia_gpus", lambda: [])
    return monkeypatch


def test_the_gpu_recipes_are_still_gpu_recipes():
    """The keys this module exists for are in the shipped recipes (a recipe edited away from them needs no test)."""
    values = [recipe_values(name) for name in GPU_RECIPES + [SFT_RECIPE]]
    assert all(v.get("bf16") is True for v in values)
    assert sum(v.get("torch_dtype") == "bfloat16" for v in values) == 2  # the LoRA recipes' frozen base


@pytest.mark.parametrize("native_bf16", [True, False])
def test_every_change_is_one_line_naming_key_and_values(cpu, native_bf16):
    cpu.setattr(cpu_fallback, "native_cpu_bf16", lambda: native_bf16)
    values = recipe_values("recipes/starcoder2-3b/finetune_lora.yaml")
    values.update(load_in_4bit=True, loss_kernel="liger", attn_implementation="flash_attention_2", tf32=True)
    fit = fit_to_machine(values)
    notice = fit.notice()
    assert notice.startswith(f"{NOTICE_PREFIX}: ") and "\n" not in notice
    expected = {"load_in_4bit": False, "loss_kernel": "auto", "attn_implementation": "auto", "tf32": False}
    if native_bf16:  # bf16 kept as CPU autocast, which transformers accepts with use_cpu; the bf16 base kept
        expected.update(bf16=True, use_cpu=True, torch_dtype="bfloat16")
        assert "use_cpu false -> true" in notice and "bf16 true -> false" not in notice
    else:  # fp32 compute, and an fp32 base: emulated bf16 matmuls are slow
        expected.update(bf16=False, torch_dtype="float32")
        assert "bf16 true -> false" in notice and "torch_dtype bfloat16 -> float32" in notice
    assert {key: values[key] for key in expected} == expected
    for words in ("load_in_4bit true -> false", "loss_kernel liger -> auto", "attn_implementation flash_attention_2"):
        assert words in notice


def test_nothing_changes_with_cuda_or_in_a_dry_run(cpu):
    values = recipe_values("recipes/starcoder2-3b/pretrain.yaml")
    assert fit_to_machine(dict(values), cuda=True).notice() is None
    planned = dict(values, dry_run=True)
    fit = fit_to_machine(planned)  # the plan is the recipe's GPUs': only bf16 taken out, kept for the plan
    assert fit.notice() is None and fit.dry_run_bf16 is True
    assert "bf16" not in planned and planned["compile_layers"] is True


@pytest.mark.parametrize(
    "words, key",
    [
        (["--load_in_4bit", "true"], "load_in_4bit"),
        (["--loss_kernel", "cut_cross_entropy"], "loss_kernel"),
        (["--float8", "true"], "float8"),
        (["--attn_implementation", "flash_attention_2"], "attn_implementation"),
    ],
)
def test_a_gpu_only_value_asked_for_explicitly_is_refused_by_key(cpu, words, key):
    parser = RecipeParser()
    parser.parse(["recipes/starcoder2-3b/finetune_lora.yaml", *words])  # parsed as given: a plan for GPUs reads it
    with pytest.raises(RecipeError, match=rf"^{key}: .* was asked for, but this machine has no CUDA GPU"):
        parser.cpu_fallback.check()  # what run.py and sft.py do first


def test_asked_for_bf16_is_honoured_on_a_cpu(cpu):
    cpu.setattr(cpu_fallback, "native_cpu_bf16", lambda: False)
    parser = RecipeParser()
    _, _, training_args = parser.parse([GPU_RECIPES[0], "--bf16", "true", "--compile_layers", "true"])
    assert training_args.bf16 and training_args.use_cpu and training_args.compile_layers  # CPU autocast, compiled
    assert (
        "use_cpu false -> true (bf16 true kept, as CPU autocast: bf16 was asked for)" in parser.cpu_fallback.notice()
    )


def test_nvidia_gpus_torch_cannot_use_are_refused(monkeypatch, tmp_path):
    (tmp_path / "0000:17:00.0").mkdir()  # as the NVIDIA driver lists a GPU
    monkeypatch.setattr(cpu_fallback, "NVIDIA_GPUS", str(tmp_path))
    monkeypatch.setattr(cpu_fallback, "cuda_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    parser = RecipeParser()
    parser.parse([GPU_RECIPES[0]])
    with pytest.raises(RecipeError, match="NVIDIA driver shows 1 GPU.*set CUDA_VISIBLE_DEVICES= .empty."):
        parser.cpu_fallback.check()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU meant: the recipe goes on
    parser.parse([GPU_RECIPES[0]])
    parser.cpu_fallback.check()


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_each_gpu_recipe_parses_on_this_cpu(name):
    """transformers refused the shipped recipes' bf16 on a CPU ("Your setup doesn't support bf16/gpu")."""
    if cpu_fallback.cuda_available():
        pytest.skip("a CUDA machine runs the recipes as written")
    parser = RecipeParser()
    parser.parse([name])
    assert parser.cpu_fallback.notice().startswith(f"{NOTICE_PREFIX}: ")


# Small and fast, without touching a GPU-only key: the model, data, length, steps and the evaluation; compile_layers
# (not GPU-only: it compiles for the CPU, tests/test_attention_compile.py) off, which saves 40 s per recipe here.
SMALL = [
    "--compile_layers", "false",
    "--seq_length", "64", "--max_steps", "2", "--per_device_train_batch_size", "2",
    "--gradient_accumulation_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--eval_fraction", "0",
    "--report_to", "none", "--num_proc", "1", "--dataloader_num_workers", "0", "--logging_steps", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir):
    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.model.factory import create_model

    tokenizer = load_tokenizer(tokenizer_dir)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_script(script: str, words: list[str]):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *words],
        capture_output=True, text=True, env=LAUNCH_ENV, cwd=ROOT, timeout=600,
    )  # fmt: skip


def assert_one_notice(result, *changed):
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in result.stderr, output[-4000:]
    notices = [line for line in output.splitlines() if f"{NOTICE_PREFIX}: " in line]
    assert len(notices) == 1, notices
    assert "use_cpu false -> true" in notices[0] or "bf16 true -> false" in notices[0]
    for key in changed:
        assert f"{key} " in notices[0], notices[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_RECIPES)
def test_each_gpu_recipe_runs_on_this_cpu_with_one_notice(name, base_dir, code_shards, tmp_path):
    values = recipe_values(name)
    model = ["--model_name_or_path", base_dir] if "model_name_or_path" in values else ["--model_config", "test"]
    words = [name, *model, "--tokenizer_name_or_path", base_dir, "--dataset_name_or_path", code_shards]
    words += ["--max_repositories", "30", "--output_dir", str(tmp_path / "out"), *SMALL]
    result = run_script("run_pretrain.py", words)
    assert_one_notice(result)
    assert (tmp_path / "out" / "trainer_state.json").exists()


def test_the_launchers_fsdp_config_is_named_as_ddp_on_a_cpu(cpu):
    cpu.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file .../fsdp.yaml` sets
    assert "accelerate config FSDP -> DDP (" in fit_to_machine(recipe_values(GPU_RECIPES[0])).notice()
    cpu.setenv("ACCELERATE_USE_FSDP", "false")
    assert "FSDP" not in fit_to_machine(recipe_values(GPU_RECIPES[0])).notice()


@pytest.mark.slow
def test_the_3b_recipe_under_the_fsdp_launch_config_says_it_runs_as_ddp(base_dir, code_shards, tmp_path):
    """accelerate makes CPU processes MULTI_CPU and applies FSDP to GPU ones only: the run is DDP, and says so."""
    words = ["recipes/starcoder2-3b/pretrain.yaml", "--model_config", "test", "--tokenizer_name_or_path", base_dir]
    words += ["--dataset_name_or_path", code_shards, "--max_repositories", "30", "--output_dir", str(tmp_path / "out")]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/fsdp.yaml"]
    command += ["--num_processes", "2", "--main_process_port", "0", "scripts/run_pretrain.py", *words, *SMALL]
    result = subprocess.run(command, capture_output=True, text=True, env=LAUNCH_ENV, cwd=ROOT, timeout=600)
    assert_one_notice(result, "accelerate config")
    assert (tmp_path / "out" / "trainer_state.json").exists()


@pytest.mark.slow
def test_the_sft_recipe_runs_on_this_cpu_with_one_notice(base_dir, tmp_path):
    from test_sft import conversations, write_jsonl

    data = write_jsonl(tmp_path / "sft.jsonl", conversations(12))
    words = [SFT_RECIPE, "--model_name_or_path", base_dir, "--dataset_name_or_path", data]
    words += ["--output_dir", str(tmp_path / "out"), "--seq_length", "64", "--max_steps", "2"]
    words += [
        "--dataset_num_proc",
        "1",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--dataloader_num_workers",
        "0",
    ]
    assert_one_notice(run_script("run_sft.py", words))
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def test_an_explicit_gpu_value_is_one_error_line_from_the_script(tmp_path):
    result = run_script("run_pretrain.py", ["recipes/starcoder2-3b/finetune_lora.yaml", "--load_in_4bit", "true"])
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: load_in_4bit: true was asked for")
