"""The model card and the Hub upload's dry run: all offline."""

import os
import re

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from starcoder2_train.configs import ModelArguments
from starcoder2_train.hub.callback import ModelCardCallback
from starcoder2_train.hub.model_card import update_model_card_results, write_model_card
from starcoder2_train.hub.upload import files_to_upload, push_to_hub
from starcoder2_train.model.factory import create_model

RECIPE = {
    "model_config": "test",
    "dataset_name_or_path": "bigcode/the-stack-v2-train-smol-ids",
    "languages": ["Python", "Rust"],
    "seq_length": 1024,
    "fim_rate": 0.5,
    "fim_spm_rate": 0.25,
    "learning_rate": 3e-4,
    "hub_token": "hf_secret_value",
}
RESULTS = {
    "loss": {"loss": 1.5, "perplexity": 4.48, "tokens": 1000, "loss/Python": 1.4, "perplexity/Python": 4.06},
    "fim": {"exact_match": 0.25, "problems": 8, "exact_match/Python": 0.5, "problems/Python": 4},
    "humaneval": {"pass@1": 0.125, "pass@10": 0.4, "problems": 164, "samples": 20, "temperature": 0.2},
}


def metric_values(card) -> dict:
    return {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}


def test_card_describes_the_run_and_parses_back(tmp_path):
    write_model_card(str(tmp_path), RECIPE, tokens_seen=123_456_789, eval_results=RESULTS, hub_model_id="me/sc2-test")
    card = ModelCard.load(tmp_path / "README.md")
    values = metric_values(card)
    assert values[("HumanEval", "pass@1")] == 0.125 and values[("HumanEval", "pass@10")] == 0.4
    assert values[("Held-out single-line infilling (Python)", "exact_match")] == 0.5
    assert values[("Held-out single-line infilling (all languages)", "exact_match")] == 0.25
    assert values[("Held-out files (Python)", "perplexity")] == 4.06
    assert {r.task_name for r in card.data.eval_results if r.metric_type == "loss"} == {"Language modelling"}
    assert len(values) == 8  # counts (tokens, problems, samples) are not metrics
    humaneval = next(r for r in card.data.eval_results if r.metric_type == "pass@1")
    assert humaneval.metric_args == {"n": 20, "temperature": 0.2}
    assert card.data.model_name == "me/sc2-test" and card.data.datasets == ["bigcode/the-stack-v2-train-smol-ids"]
    assert card.data.base_model is None
    text = card.text
    assert "trained from scratch with the `test` architecture" in text
    assert "Python, Rust" in text and "123,456,789" in text
    assert "| fim_spm_rate | 0.25 |" in text and "| fim_fragment_rate | 0.5 |" in text  # recipe, then default
    assert "<fim_prefix>" in text and 'checkpoint = "me/sc2-test"' in text
    assert "hf_secret_value" not in (tmp_path / "README.md").read_text()


def test_card_of_a_continued_model_names_its_base(tmp_path):
    recipe = {"model_name_or_path": "bigcode/starcoder2-3b", "dataset_name_or_path": str(tmp_path)}
    card = write_model_card(str(tmp_path), recipe)
    assert card.data.base_model == "bigcode/starcoder2-3b" and card.data.datasets is None  # a local path is no id
    assert "continued from `bigcode/starcoder2-3b`" in card.text and "Not evaluated yet" in card.text
    assert not card.data.eval_results


def test_results_can_be_updated_later(tmp_path):
    write_model_card(str(tmp_path), RECIPE, eval_results={"fim": {"exact_match": 0.1}})
    update_model_card_results(str(tmp_path), {"humaneval": {"pass@1": 0.3}})
    card = ModelCard.load(tmp_path / "README.md")
    assert metric_values(card) == {("HumanEval", "pass@1"): 0.3}
    assert "| humaneval | pass@1 | 0.3 |" in card.text and "| fim |" not in card.text
    assert "## Recipe" in card.text  # the rest of the card is kept
    with pytest.raises(FileNotFoundError, match="write_model_card"):
        update_model_card_results(str(tmp_path / "missing"), RESULTS)


@pytest.fixture
def saved_run(tmp_path, tokenizer):
    """A final model directory as training leaves it, with training state beside the model files."""
    torch.manual_seed(0)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    output = tmp_path / "run"
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    write_model_card(str(output), RECIPE, tokens_seen=1000, eval_results=RESULTS, hub_model_id="me/sc2-test")
    for junk in (
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pth",
        "training_args.bin",
        "checkpoint-5/model.bin",
        "runs/events.out",
        "global_step5/zero.pt",
        ".cache/x",
        "eval_results.json",
    ):
        (output / junk).parent.mkdir(parents=True, exist_ok=True)
        (output / junk).write_bytes(b"x")
    return model, output


def test_dry_run_writes_exactly_the_upload(saved_run, tmp_path, tokenizer):
    model, output = saved_run
    dry = tmp_path / "upload"
    uploaded = push_to_hub(str(output), "me/sc2-test", private=True, revision="step-5", dry_run_dir=str(dry))
    on_disk = sorted(os.path.relpath(os.path.join(root, f), dry) for root, _, files in os.walk(dry) for f in files)
    assert uploaded == on_disk == files_to_upload(str(output))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "eval_results.json"} <= set(uploaded)
    assert not [
        p
        for p in uploaded
        if re.search(
            r"optimizer|scheduler|rng_state|training_args|checkpoint-|runs/|"
            r"global_step|^\.",
            p,
        )
    ]

    reloaded = AutoModelForCausalLM.from_pretrained(dry)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert AutoTokenizer.from_pretrained(dry).get_vocab() == tokenizer.get_vocab()
    card = ModelCard.load(dry / "README.md")
    assert metric_values(card)[("HumanEval", "pass@1")] == 0.125

    # The card's FIM example runs as written against the uploaded folder.
    example = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    example = example.replace('"me/sc2-test"', repr(str(dry))).replace("print(", "completion = (")
    namespace = {}
    exec(example, namespace)
    assert isinstance(namespace["completion"], str)


def test_upload_errors_say_what_to_do(saved_run, tmp_path):
    _, output = saved_run
    with pytest.raises(ValueError, match="user-or-org/model-name"):
        push_to_hub(str(output), "no-namespace", dry_run_dir=str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        push_to_hub(str(output), "me/sc2-test", dry_run_dir=str(tmp_path / "b"))
    os.remove(output / "README.md")
    with pytest.raises(FileNotFoundError, match="write_model_card"):
        push_to_hub(str(output), "me/sc2-test", dry_run_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_to_hub(str(tmp_path), "me/sc2-test", dry_run_dir=str(tmp_path / "d"))


def test_every_checkpoint_gets_a_card(saved_run, tmp_path, tokenizer):
    model, _ = saved_run
    ids = torch.tensor(tokenizer("def add(a, b):\n    return a + b\n")["input_ids"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "train"),
        max_steps=2,
        save_steps=1,
        report_to=[],
        per_device_train_batch_size=1,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": ids, "labels": ids}] * 2,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[ModelCardCallback(RECIPE, tokens_per_step=len(ids))],
    )
    trainer.train()
    for step in (1, 2):
        card = ModelCard.load(tmp_path / "train" / f"checkpoint-{step}" / "README.md")
        assert f"Tokens seen: {step * len(ids):,}" in card.text
    uploaded = push_to_hub(str(tmp_path / "train" / "checkpoint-2"), "me/sc2-test", dry_run_dir=str(tmp_path / "up"))
    assert "README.md" in uploaded and "model.safetensors" in uploaded and "optimizer.pt" not in uploaded
    assert not [path for path in uploaded if path.endswith((".pth", ".bin", ".pt"))]
