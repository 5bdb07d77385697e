"""compile_layers under DeepSpeed: kept under ZeRO-1/2, turned off with a warning under ZeRO-3 (training/trainer.py).

ZeRO-3 gathers a submodule's parameters in a forward pre-hook that DeepSpeed 0.19.8 excludes from compilation
(`@torch.compiler.disable`); the first test shows on the CPU what such a hook does to a compiled layer.
"""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from transformers import AutoModelForCausalLM, Starcoder2Config
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from starcoder2_train.data.batches.collators import document_boundaries
from starcoder2_train.model.attention import SDPA_VARLEN
from starcoder2_train.model.presets import MODEL_PRESETS
from starcoder2_train.recipe import RecipeParser
from starcoder2_train.training.trainer import ZERO3_COMPILE_WARNING, decoder_layers, prepare_model

ROOT = Path(__file__).parents[1]


def tiny_model():
    config = Starcoder2Config(**{**MODEL_PRESETS["test"], "vocab_size": 96})
    model = AutoModelForCausalLM.from_config(config, attn_implementation=SDPA_VARLEN).train()
    model.config.use_cache = False
    return model


def test_a_compiler_disabled_pre_hook_on_each_submodule_splits_a_compiled_layer():
    torch._dynamo.reset()
    layer = tiny_model().model.layers[0]
    positions = torch.arange(100)[None]
    hidden = torch.randn(1, 100, 64)
    inputs = dict(hidden_states=hidden, position_ids=positions, **document_boundaries(positions))
    inputs["position_embeddings"] = tiny_model().model.rotary_emb(hidden, position_ids=positions)
    assert torch._dynamo.explain(layer)(**inputs).graph_count == 1

    @torch.compiler.disable  # as DeepSpeed 0.19.8's ZeRO-3 _pre_forward_module_hook
    def gather_parameters(module, *args):
        pass

    for module in layer.modules():
        module.register_forward_pre_hook(gather_parameters)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(**inputs).graph_count > 10  # 14 measured: one per submodule and more
    torch._dynamo.reset()


def training_args(tmp_path, *words):
    """Parsed as run_pretrain parses them. TrainingArguments with a ZeRO-3 JSON make transformers build later models
    inside deepspeed.zero.Init (a process group): that global is unset again, the JSON stays in the arguments."""
    base = ["--model_config", "test", "--dataset_name_or_path", "x", "--output_dir", str(tmp_path)]
    args = RecipeParser().parse([*base, "--compile_layers", "true", "--use_cpu", "true", *words])[-1]
    unset_hf_deepspeed_config()
    return args


@pytest.mark.parametrize("stage", [3, 2])
def test_compile_layers_is_off_under_zero3_and_on_under_zero2(stage, tmp_path, caplog):
    args = training_args(tmp_path, "--deepspeed", str(ROOT / f"accelerate_configs/deepspeed/zero{stage}.json"))
    model = tiny_model()
    with caplog.at_level(logging.INFO, logger="starcoder2_train.training.trainer"):
        prepare_model(model, args)
    compiled = [layer._compiled_call_impl is not None for layer in decoder_layers(model)]
    if stage == 3:
        assert compiled == [False, False]
        assert ZERO3_COMPILE_WARNING in caplog.text
        assert ZERO3_COMPILE_WARNING.startswith("compile_layers: true is turned off under ZeRO-3 because")
        assert "compile_layers: 0 of 2 decoder layers compiled" in caplog.text
    else:
        assert compiled == [True, True]
        assert "turned off" not in caplog.text and "compile_layers: 2 of 2 decoder layers compiled" in caplog.text


def test_the_zero_stage_is_read_from_the_config_file_accelerate_passes(tmp_path, monkeypatch, caplog):
    # accelerate launch with a deepspeed_config_file sets ACCELERATE_DEEPSPEED_CONFIG_FILE, not the stage variable.
    args = training_args(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "accelerate_configs/deepspeed/zero3.json"))
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    model = tiny_model()
    with caplog.at_level(logging.WARNING, logger="starcoder2_train.training.trainer"):
        prepare_model(model, args)
    assert ZERO3_COMPILE_WARNING in caplog.text
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


@pytest.mark.slow
def test_a_zero3_run_says_compile_layers_is_off_and_trains(tmp_path, tokenizer_dir):
    """accelerate launch, 2 CPU processes (gloo), accelerate_configs/deepspeed_zero3.yaml (a deepspeed_config_file):
    the run's output carries the warning and the count of compiled layers (0), and it trains."""
    pytest.importorskip("deepspeed")
    from conftest import LAUNCH_ENV, random_repositories, write_repository_shards

    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.model.factory import create_model

    tokenizer = load_tokenizer(tokenizer_dir)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "start")  # a saved start: ZeRO-3's sharded init builds no random model
    tokenizer.save_pretrained(tmp_path / "start")
    shards = write_repository_shards(tmp_path / "shards", random_repositories(20, seed=3), num_files=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tmp_path / 'start'}\ntorch_dtype: float32\ndataset_name_or_path: {shards}\n"
        "seq_length: 64\nmax_steps: 2\nlogging_steps: 1\nsave_strategy: 'no'\nreport_to: none\nbf16: false\n"
        "dataloader_num_workers: 0\nattn_implementation: sdpa_varlen\ncompile_layers: true\nlog_level: info\n"
    )
    words = [str(recipe), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    words += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += ["accelerate_configs/deepspeed_zero3.yaml", "--num_processes", "2", "--main_process_port", "0"]
    result = subprocess.run(
        [*command, "scripts/run_pretrain.py", *words], cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-5000:]
    output = result.stdout + result.stderr
    assert ZERO3_COMPILE_WARNING in output and "compile_layers: 0 of 2 decoder layers compiled" in output
