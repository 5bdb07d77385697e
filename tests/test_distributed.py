"""Real `accelerate launch` with 2 processes under DeepSpeed ZeRO-2 and ZeRO-3 (gloo, CPU).

The losses of 2 processes x micro batch 2 equal 1 process x micro batch 4 (same global batch, same data
order): measured within one float32 ulp (4.8e-7 at a loss of 5.5); the tolerance is rel 1e-5.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LAUNCH_ENV, random_repositories, write_repository_shards

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow
deepspeed = pytest.importorskip("deepspeed")

ENV = LAUNCH_ENV


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    """A saved starting checkpoint (so that ZeRO-3's sharded init does not change the weights) and a recipe."""
    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.model.factory import create_model

    root = tmp_path_factory.mktemp("distributed")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    model.save_pretrained(root / "start")
    tokenizer.save_pretrained(root / "start")
    shards = write_repository_shards(root / "shards", random_repositories(80, seed=31), num_files=1)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "\n".join(
            [
                f"model_name_or_path: {root / 'start'}",
                "torch_dtype: float32",
                "attn_implementation: sdpa",
                f"dataset_name_or_path: {shards}",
                "seq_length: 64",
                "max_steps: 6",
                "learning_rate: 3.0e-3",
                "warmup_steps: 1",
                "logging_steps: 1",
                "save_strategy: 'no'",
                "report_to: none",
                "seed: 5",
                "bf16: false",
                "disable_tqdm: true",
                "dataloader_num_workers: 0",
            ]
        )
        + "\n"
    )
    return root, recipe


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def run(words: list[str], timeout: int = 600) -> None:
    result = subprocess.run(words, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])


def launch_two(config: str, recipe, *words: str) -> None:
    """`accelerate launch` of the training script in 2 processes, micro batch 2 each."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2"]
    command += ["--main_process_port", "0", "scripts/run_pretrain.py", str(recipe)]
    run(command + ["--per_device_train_batch_size", "2", *words])


@pytest.fixture(scope="module")
def one_process(setup):
    root, recipe = setup
    run(
        [
            sys.executable,
            "scripts/run_pretrain.py",
            str(recipe),
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(root / "one"),
            "--use_cpu",
            "true",
        ]
    )
    return losses(root / "one")


@pytest.mark.parametrize("stage", ["2", "3"])
def test_two_processes_train_like_one_and_save_a_plain_model(stage, setup, one_process):
    root, recipe = setup
    out = root / f"zero{stage}"
    launch_two(f"accelerate_configs/deepspeed_zero{stage}.yaml", recipe, "--output_dir", str(out))
    two = losses(out)
    assert len(two) == len(one_process) == 6
    assert two == pytest.approx(one_process, rel=1e-5)
    assert one_process[-1] < one_process[0]
    assert (out / "model.safetensors").exists()
    program = (
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t('def f(x):', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)\n"
        "assert out.shape[1] > ids.shape[1]; print('OK', out.shape[1] - ids.shape[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", program], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stderr[-2000:]


def test_two_processes_train_on_a_prepared_store_like_one_on_the_shards(setup, one_process):
    """datatrove tasks write the store, 2 ranks with 2 loader workers each open it: the same run as from shards."""
    root, recipe = setup
    prepared = root / "prepared"
    run([sys.executable, "scripts/prepare_data.py", str(recipe), "--output", str(prepared), "--tasks", "2"])
    out = root / "prepared-zero2"
    launch_two(
        "accelerate_configs/deepspeed_zero2.yaml",
        recipe,
        *("--prepared_data_dir", str(prepared), "--dataloader_num_workers", "2", "--output_dir", str(out)),
    )
    assert losses(out) == pytest.approx(one_process, rel=1e-5)


def test_later_epochs_made_by_the_loader_workers_of_two_ranks_train_like_one_process(setup):
    """160 steps read past data epoch 0 (590 windows): epoch 1 is made mid-run, by each machine once."""
    root, recipe = setup
    long = ("--max_steps", "160", "--logging_steps", "10")
    one, two = root / "long-one", root / "long-two"
    run([sys.executable, "scripts/run_pretrain.py", str(recipe), *long, "--per_device_train_batch_size", "4"]
        + ["--use_cpu", "true", "--output_dir", str(one)])  # fmt: skip
    launch_two(
        "accelerate_configs/deepspeed_zero2.yaml",
        recipe,
        *long,
        *("--dataloader_num_workers", "2", "--output_dir", str(two)),
    )
    assert len(losses(one)) == 16 and losses(two) == pytest.approx(losses(one), rel=1e-5)


@pytest.mark.parametrize(
    "stage,optimizer",
    [("1", "BF16_Optimizer"), ("2", "DeepSpeedZeroOptimizer"), ("3", "DeepSpeedZeroOptimizer_Stage3")],
)
def test_bf16_runs_keep_fp32_master_weights_and_accumulate_gradients_in_fp32(stage, optimizer, setup):
    """The recipes' precision, as DeepSpeed really builds it from accelerate_configs/deepspeed/*.json: bf16 weights
    and compute, fp32 master weights in the optimizer, gradients of the micro batches accumulated in fp32."""
    root, recipe = setup
    out = root / f"bf16-zero{stage}"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [f"accelerate_configs/deepspeed_zero{stage}.yaml", "--num_processes", "2", "--main_process_port", "0"]
    command += ["scripts/run_pretrain.py", str(recipe), "--output_dir", str(out), "--bf16", "true", "--use_cpu"]
    command += ["true", "--max_steps", "3", "--gradient_accumulation_steps", "2", "--log_level", "info"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    line = next(line for line in result.stdout.splitlines() if "precision: " in line)
    expected = "weights bfloat16, compute bfloat16, master_weights float32, gradient_accumulation float32"
    assert f"{expected}, optimizer {optimizer}" in line, line
    assert len(losses(out)) == 3


def test_the_3b_recipes_fast_path_keys_train_together_under_zero2(setup):
    """What recipes/starcoder2-3b/pretrain.yaml turns on, on the test model: sdpa_varlen as a compiled custom op in
    every layer, loss_kernel auto (chunked here), gradient_checkpointing_layers auto, DeepSpeed ZeRO-2 in bf16."""
    root, recipe = setup
    out = root / "fast-path"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += ["accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "2", "--main_process_port", "0"]
    command += ["scripts/run_pretrain.py", str(recipe), "--output_dir", str(out), "--bf16", "true", "--use_cpu"]
    command += ["true", "--attn_implementation", "sdpa_varlen", "--compile_layers", "true", "--loss_kernel", "auto"]
    command += ["--loss_chunk_size", "32", "--gradient_checkpointing_layers", "auto", "--log_level", "info"]
    command += ["--gradient_accumulation_steps", "2"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "sdpa_varlen on cpu in torch.float32 matches the reference" in result.stdout
    assert "loss kernel chunked (loss_kernel: auto)" in result.stdout
    assert "optimizer DeepSpeedZeroOptimizer" in result.stdout
    trained = losses(out)
    assert len(trained) == 6 and trained[-1] < trained[0]


def test_muon_under_two_ddp_processes_trains_like_one_and_is_refused_under_zero2(setup, one_process):
    """muon: true across 2 CPU processes (DDP over gloo): each rank orthogonalises the same averaged gradients, so the
    losses are the 1-process run's; an accelerate DeepSpeed config is refused by name before any step."""
    root, recipe = setup
    one = root / "muon-one"
    run([sys.executable, "scripts/run_pretrain.py", str(recipe), "--muon", "true", "--use_cpu", "true"]
        + ["--per_device_train_batch_size", "4", "--output_dir", str(one)])  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--mixed_precision", "no", "--main_process_port", "0", "scripts/run_pretrain.py", str(recipe)]
    two = root / "muon-two"
    run(
        command
        + ["--muon", "true", "--use_cpu", "true", "--per_device_train_batch_size", "2", "--output_dir", str(two)]
    )
    assert losses(two) == pytest.approx(losses(one), rel=1e-5) and losses(one)[-1] < losses(one)[0]
    assert losses(one)[1:] != pytest.approx(one_process[1:], rel=1e-3)  # Muon stepped, not AdamW

    zero2 = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    zero2 += ["accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "2", "--main_process_port", "0"]
    zero2 += ["scripts/run_pretrain.py", str(recipe), "--muon", "true", "--output_dir", str(root / "muon-zero2")]
    refused = subprocess.run(zero2, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert "muon: true cannot run under DeepSpeed" in refused.stderr, refused.stderr[-3000:]
