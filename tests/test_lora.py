"""LoRA through peft on the tiny model: only adapters train, targets are checked, merging is exact, QLoRA refuses
this CPU machine, and the adapter size is known from the config alone."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import LAUNCH_ENV
from transformers import AutoModelForCausalLM

from starcoder2_train.configs import ModelArguments, RecipeError
from starcoder2_train.model import lora
from starcoder2_train.model.factory import create_model
from starcoder2_train.model.lora import (
    DEFAULT_TARGET_MODULES,
    apply_lora,
    load_quantized_base,
    lora_parameter_count,
    merge_adapter,
    parameter_summary,
    quantization_config,
    trainable_parameters,
)
from starcoder2_train.model.presets import build_config

SCRIPT = str(Path(__file__).parents[1] / "scripts" / "merge_adapter.py")
STEPS = 8
# Merged against adapted logits in float32: W + s·BA summed once against x·W + s·(x·A)·B per call, which rounds
# differently by CPU (up to 1.7e-5 on an Intel Xeon at lora_alpha/r = 8); without the adapter they move by more than
# 1e-3 (each test checks that too).
MERGE_TOLERANCE = 1e-4


def tiny_model(tokenizer, path=None):
    model_args = ModelArguments(model_config=None if path else "test", model_name_or_path=path, torch_dtype="float32")
    return create_model(model_args, tokenizer=tokenizer)


def batch(tokenizer, rows=4, length=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tokenizer), (rows, length), generator=generator)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A saved tiny base, LoRA on it trained for a few Adam steps on one fixed batch, and the saved adapter."""
    torch.manual_seed(0)
    base_dir = str(tmp_path_factory.mktemp("base"))
    tiny_model(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = apply_lora(tiny_model(tokenizer, base_dir), r=8, alpha=16)
    base_before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    lora_before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids, losses = batch(tokenizer), []
    model.train()
    for _ in range(STEPS):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    adapter_dir = str(tmp_path_factory.mktemp("adapter"))
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return SimpleNamespace(
        model=model,
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        losses=losses,
        base_before=base_before,
        lora_before=lora_before,
    )


def test_only_adapters_train(trained):
    model = trained.model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == set(DEFAULT_TARGET_MODULES)
    losses = trained.losses
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.3, losses
    after = dict(model.named_parameters())
    for name, before in trained.base_before.items():
        assert torch.equal(after[name].detach(), before), f"{name} changed"
    changed = [name for name, before in trained.lora_before.items() if not torch.equal(after[name].detach(), before)]
    assert sorted(changed) == sorted(trained.lora_before)  # every lora_A and lora_B moved (lora_B starts at 0)
    count, total = trainable_parameters(model)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    assert parameter_summary(model).startswith(f"trainable parameters: {count:,} of {total:,}")


def test_wrong_target_is_refused_before_peft(tokenizer):
    model = tiny_model(tokenizer)
    with pytest.raises(RecipeError) as error:
        apply_lora(model, target_modules=("q_proj", "gate_proj", "down_proj"))
    message = str(error.value)
    assert "lora_target_modules: gate_proj, down_proj" in message
    assert "c_fc" in message and "c_proj" in message and "q_proj" in message.split("linear modules are")[1]
    assert not any("lora_" in name for name, _ in model.named_parameters())  # peft never ran
    for bad in (dict(r=0), dict(alpha=0), dict(dropout=1.0)):
        with pytest.raises(RecipeError, match=f"lora_{next(iter(bad))}"):
            apply_lora(model, **bad)


def test_lora_parameter_count_equals_peft(tokenizer, trained):
    config = trained.model.config
    assert trainable_parameters(trained.model)[0] == lora_parameter_count(config, 8)
    subset = ("q_proj", "v_proj", "c_proj")
    model = apply_lora(tiny_model(tokenizer), r=4, target_modules=",".join(subset), gradient_checkpointing=True)
    assert trainable_parameters(model)[0] == lora_parameter_count(config, 4, subset)
    assert model.base_model.model.is_activation_checkpointing
    model.train()
    input_ids = batch(tokenizer, rows=2, length=16)
    model(input_ids=input_ids, labels=input_ids).loss.backward()  # checkpointed, frozen embeddings: still grads
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(RecipeError, match="gate_proj"):
        lora_parameter_count(config, 8, ("gate_proj",))


def test_merged_model_equals_base_plus_adapter(trained, tmp_path):
    output = merge_adapter(trained.adapter_dir, str(tmp_path / "merged"))
    files = sorted(os.listdir(output))
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(name.startswith("adapter_") for name in files), files
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    assert merged.config.use_cache and merged.dtype == torch.float32
    assert not any("lora" in name for name, _ in merged.named_parameters())
    input_ids = batch_for(trained)
    with torch.no_grad():
        expected = trained.model(input_ids=input_ids).logits
        got = merged(input_ids=input_ids).logits
        base = AutoModelForCausalLM.from_pretrained(trained.base_dir).eval()(input_ids=input_ids).logits
    assert (got - expected).abs().max() <= MERGE_TOLERANCE
    assert (base - expected).abs().max() > 1e-3  # the adapter does change the model: the check above means something


def batch_for(trained):
    return torch.randint(0, trained.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


# Loads the merged model where neither peft nor this project can be imported, and saves its logits.
PEFT_FREE_LOAD = """
import sys
sys.modules["peft"] = None
sys.modules["starcoder2_train"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, input_path, output_path = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(directory).eval()
AutoTokenizer.from_pretrained(directory)
with torch.no_grad():
    torch.save(model(input_ids=torch.load(input_path)).logits, output_path)
"""


def test_merge_script_output_loads_without_peft(trained, tmp_path):
    output = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, SCRIPT, trained.adapter_dir, "--output", str(output), "--dtype", "float32"],
        capture_output=True,
        text=True,
        env=LAUNCH_ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"merged model written to {output}" in result.stdout and "model.safetensors" in result.stdout

    input_ids = batch_for(trained)
    torch.save(input_ids, tmp_path / "input.pt")
    load = [sys.executable, "-c", PEFT_FREE_LOAD, str(output), str(tmp_path / "input.pt"), str(tmp_path / "out.pt")]
    result = subprocess.run(load, capture_output=True, text=True, env=LAUNCH_ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = trained.model(input_ids=input_ids).logits
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max() <= MERGE_TOLERANCE


def test_merge_script_refuses_a_directory_without_an_adapter(trained, tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, trained.base_dir, "--output", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        env=LAUNCH_ENV,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and trained.base_dir in result.stderr
    assert "adapter_config.json" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "merged").exists()


def test_merge_into_a_base_whose_embeddings_training_resized(tokenizer, tmp_path):
    """A tokenizer larger than the checkpoint: create_model resized the embeddings, peft saved them with the
    adapter, and the merge resizes the base to match before loading it."""
    config = build_config(ModelArguments(model_config="test"), 0)
    config.vocab_size = 512  # fewer rows than the tokenizer's tokens
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    model = apply_lora(tiny_model(tokenizer, str(tmp_path / "base")), r=4)
    assert model.get_input_embeddings().weight.shape[0] > 512
    with torch.no_grad():  # as if trained: lora_B away from its zeros
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(str(tmp_path / "adapter"), str(tmp_path / "merged")))
    input_ids = batch(tokenizer, rows=2, length=16)
    with torch.no_grad():
        expected = model.eval()(input_ids=input_ids).logits
        assert (merged.eval()(input_ids=input_ids).logits - expected).abs().max() <= MERGE_TOLERANCE
        with model.disable_adapter():  # the adapter does change the model: the check above means something
            assert (model(input_ids=input_ids).logits - expected).abs().max() > 1e-3


def test_merge_refuses_a_quantized_base_and_its_own_directory(trained, tmp_path):
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads(Path(trained.base_dir, "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(RecipeError, match="saved quantized .*bf16/fp32"):
        merge_adapter(trained.adapter_dir, str(tmp_path / "merged"), base_model=str(quantized))
    with pytest.raises(RecipeError, match="is the adapter directory"):
        merge_adapter(trained.adapter_dir, trained.adapter_dir)
    assert not (tmp_path / "merged").exists()


def test_qlora_is_refused_on_a_cpu_machine(monkeypatch):
    for device_type in ("cpu", "cuda"):
        with pytest.raises(RecipeError, match="needs a CUDA GPU with the bitsandbytes .*load_in_4bit: false"):
            quantization_config(device_type)
    # Refused before anything is read: this checkpoint does not even exist.
    with pytest.raises(RecipeError, match="load_in_4bit: QLoRA"):
        load_quantized_base(ModelArguments(model_name_or_path="/no/such/checkpoint"))
    # What a CUDA machine with bitsandbytes gets.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(lora, "_bitsandbytes_installed", lambda: True)
    config = quantization_config("cuda")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
