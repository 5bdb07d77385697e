"""`muon: true`: which parameters Muon steps, a real run that trains and resumes exactly, and the refusals."""

import pytest
import torch
from conftest import load_script
from test_training import losses_of, tiny_recipe

from starcoder2_train.configs import ModelArguments, PretrainingArguments, RecipeError
from starcoder2_train.model.factory import create_model
from starcoder2_train.training.optimizer import MuonWithAdamW, muon_parameter_names, muon_with_adamw

run_pretrain = load_script("run_pretrain")


def test_muon_takes_the_layer_matrices_and_adamw_the_rest(tokenizer, tmp_path):
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    args = PretrainingArguments(str(tmp_path), muon=True, learning_rate=1e-3, weight_decay=0.1, use_cpu=True)
    decay = {name for name, p in model.named_parameters() if p.ndim >= 2}  # the Trainer's rule, for this model
    optimizer = muon_with_adamw(model, args, decay)
    hidden = muon_parameter_names(model)
    names = {id(p): name for name, p in model.named_parameters()}
    muon = [names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]]
    adamw = {names[id(p)]: group["weight_decay"] for group in optimizer.adamw.param_groups for p in group["params"]}
    assert set(muon) == hidden and not hidden & set(adamw)
    assert set(muon) | set(adamw) == set(names.values())  # every parameter once (tied lm_head is the embedding)
    assert hidden and all(".layers." in name and "norm" not in name and "bias" not in name for name in hidden)
    assert any("q_proj.weight" in n for n in hidden) and any("c_fc.weight" in n for n in hidden)
    assert adamw["model.embed_tokens.weight"] == 0.1 and adamw["model.norm.weight"] == 0.0
    assert all(rate == 0.0 for name, rate in adamw.items() if name.endswith(".bias"))
    # The Trainer logs the first group's rate: AdamW's, the recipe's learning_rate.
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3] * len(optimizer.adamw.param_groups) + [0.02]


def weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


@pytest.mark.slow
def test_a_muon_run_trains_schedules_both_rates_and_resumes_exactly(tmp_path, code_shards, tokenizer_dir):
    common = dict(muon=True, muon_learning_rate=0.04, max_steps=8, save_strategy="steps", save_steps=4)
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
    whole = run_pretrain.main(tiny_recipe(tmp_path / "whole", code_shards, tokenizer_dir, **common))
    optimizer = whole.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, MuonWithAdamW)
    losses = losses_of(whole)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    # One cosine schedule scales both rates: at the end each group is at the same fraction of its peak.
    (muon_group,) = optimizer.muon.param_groups
    fraction = muon_group["lr"] / 0.04
    assert 0 <= fraction < 0.1 and optimizer.adamw.param_groups[0]["lr"] == pytest.approx(3e-3 * fraction)
    assert all(state["momentum_buffer"].abs().sum() > 0 for state in optimizer.muon.state.values())

    # Resume from checkpoint-4 in a fresh process state: Muon's momentum and AdamW's moments come back.
    checkpoint = tmp_path / "whole" / "out" / "checkpoint-4"
    resumed_argv = tiny_recipe(tmp_path / "resumed", code_shards, tokenizer_dir, **common)
    resumed = run_pretrain.main(resumed_argv + ["--resume_from_checkpoint", str(checkpoint)])
    assert losses_of(resumed) == pytest.approx(losses, rel=1e-5)  # steps 1-4 from the checkpoint, 5-8 run again
    final, again = weights(whole.model), weights(resumed.model)
    assert all(torch.allclose(final[name], again[name], atol=1e-6) for name in final)


def test_a_muon_checkpoint_state_is_refused_by_a_plain_optimizer_state_and_back(tokenizer, tmp_path):
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    args = PretrainingArguments(str(tmp_path), muon=True, use_cpu=True)
    optimizer = muon_with_adamw(model, args, set())
    with pytest.raises(RecipeError, match="not a Muon \\+ AdamW state"):
        optimizer.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(muon=True, muon_learning_rate=0.0), "muon_learning_rate must be positive"),
        (dict(muon=True, optim="adafactor"), "optim: adafactor cannot be combined"),
    ],
)
def test_bad_muon_settings_are_refused_naming_the_key(overrides, message, tmp_path, code_shards, tokenizer_dir):
    with pytest.raises(RecipeError, match=message):
        run_pretrain.main(tiny_recipe(tmp_path, code_shards, tokenizer_dir, max_steps=1, **overrides))


def test_muon_under_deepspeed_is_refused_before_training(tmp_path, code_shards, tokenizer_dir):
    import json

    config = tmp_path / "zero2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(RecipeError, match="muon: true cannot run under DeepSpeed \\(deepspeed: is set\\)"):
        run_pretrain.main(tiny_recipe(tmp_path, code_shards, tokenizer_dir, muon=True, deepspeed=str(config)))
