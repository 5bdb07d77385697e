"""notebooks/finetune_lora.ipynb executed end to end by papermill (a real Jupyter kernel), on a tiny saved model
and a folder of synthetic repositories: ingest, packed samples, LoRA training with FIM, loss curve, infill before
and after, merge; and the Python API it uses, in this process."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import random_repositories

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "notebooks" / "finetune_lora.ipynb"

# The tiny model on a CPU: what the notebook's `overrides` parameter changes in the 3B LoRA recipe. No precision
# key: the shipped recipe's bf16 and bf16 base run as they are on a machine without CUDA (training/cpu_fallback.py).
TINY = dict(
    seq_length=64,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    gradient_checkpointing_layers=0,
    learning_rate=5e-3,
    warmup_steps=1,
    lora_r=8,
    eval_fraction=0.3,
    eval_strategy="no",
    save_strategy="no",
    logging_steps=1,
    report_to="none",
    num_proc=1,
    dataloader_num_workers=0,
    loss_kernel="transformers",
    disable_tqdm=True,
)


@pytest.fixture(scope="module")
def base_and_code(tmp_path_factory, tokenizer_dir):
    """A saved tiny base model with its tokenizer, and a folder of 20 repositories (one per sub-folder), of which
    eval_fraction 0.3 holds out 2."""
    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.data.filters.splits import eval_share
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.model.factory import create_model

    root = tmp_path_factory.mktemp("notebook")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    repositories = random_repositories(20, seed=23, max_files=4)
    names = [repository["repo_name"].replace("/", "__") for repository in repositories]  # the folders' names
    assert sum(eval_share(name) < TINY["eval_fraction"] for name in names) == 2
    for repository in repositories:
        for file in repository["files"]:
            path = root / "code" / repository["repo_name"].replace("/", "__") / file["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(file["content"] * 3)
    return root


def adapter_weights_and_base(output_dir: Path):
    files = set(os.listdir(output_dir / "adapter"))
    return files, set(os.listdir(output_dir / "merged"))


@pytest.mark.slow
def test_the_notebook_fine_tunes_merges_and_saves(base_and_code):
    papermill = pytest.importorskip("papermill")
    root = base_and_code
    output_dir = root / "run"
    executed = root / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(executed),
        parameters=dict(
            model_name_or_path=str(root / "base"),
            code_dir=str(root / "code"),
            output_dir=str(output_dir),
            max_steps=12,
            overrides=TINY,
        ),
        cwd=str(ROOT / "notebooks"),  # as Jupyter opens it; the recipe path resolves against the root
        kernel_name="python3",
        progress_bar=False,
    )
    notebook = json.loads(executed.read_text())
    tags = notebook["cells"][1]["metadata"].get("tags", [])
    assert "parameters" in tags
    outputs = "".join(
        "".join(output.get("text", "")) + json.dumps(output.get("data", {}))
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        for output in cell.get("outputs", [])
    )
    assert "<file_sep>" in outputs and "<fim_" in outputs  # the packed sample, as the model sees it
    if not torch.cuda.is_available():  # the recipe's bf16 on a CPU: said once, in one line (training/cpu_fallback.py)
        notices = [line for line in outputs.replace("\\n", "\n").splitlines() if "no CUDA GPU: " in line]
        assert len(notices) == 1 and ("use_cpu false -> true" in notices[0] or "bf16 true -> false" in notices[0])
    assert "expected:" in outputs and "before:" in outputs and "after:" in outputs
    adapter, merged = adapter_weights_and_base(output_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= adapter
    assert "model.safetensors" in merged and not any(name.startswith("adapter_") for name in merged)
    assert (output_dir / "loss_curve.png").stat().st_size > 1000
    assert "](loss_curve.png)" in (output_dir / "adapter" / "README.md").read_text()  # the adapter's card shows it
    assert (output_dir / "adapter" / "loss_curve.png").exists()
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.mark.slow
def test_the_notebook_runs_with_only_its_documented_parameters(tokenizer_dir, tmp_path):
    """As a new user runs it: a small local base model (4,096 positions, the recipe's seq_length), a folder of
    three repositories, an output folder and max_steps 6, nothing else. eval_fraction 0.05 holds none of the three
    out and 6 steps log none (logging_steps 10): the run still trains, merges and saves, and says what it skipped
    (before: transformers refused the eval_strategy without an eval_dataset; the notebook stopped at the infill, then
    at the loss list and the loss curve)."""
    papermill = pytest.importorskip("papermill")
    from starcoder2_train.configs import ModelArguments
    from starcoder2_train.data.filters.splits import eval_share
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.model.factory import create_model

    tokenizer = load_tokenizer(tokenizer_dir)
    arguments = ModelArguments(model_config="test", torch_dtype="float32", max_position_embeddings=4096)
    create_model(arguments, tokenizer=tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    repositories = random_repositories(3, seed=5, max_files=4)
    assert all(eval_share(r["repo_name"].replace("/", "__")) >= 0.05 for r in repositories)  # none held out
    for repository in repositories:
        for file in repository["files"]:
            path = tmp_path / "code" / repository["repo_name"].replace("/", "__") / file["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(file["content"] * 20)
    output_dir = tmp_path / "run"
    parameters = dict(model_name_or_path=str(tmp_path / "base"), code_dir=str(tmp_path / "code"), max_steps=6)
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), parameters=dict(parameters, output_dir=str(output_dir)),
        cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False,
    )  # fmt: skip
    notebook = json.loads((tmp_path / "executed.ipynb").read_text())
    outputs = "".join(
        "".join(output.get("text", "")) for cell in notebook["cells"] for output in cell.get("outputs", [])
    )
    assert "the infill before and after training is skipped" in outputs
    assert "eval_strategy steps -> no" in outputs and "no step logged (max_steps 6 < logging_steps 10)" in outputs
    adapter, merged = adapter_weights_and_base(output_dir)
    assert "adapter_model.safetensors" in adapter and "model.safetensors" in merged
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 6


def test_the_api_refuses_an_unknown_key_and_a_wrong_type_when_set(base_and_code):
    from starcoder2_train import Recipe
    from starcoder2_train.configs import RecipeError

    recipe = Recipe(ROOT / "recipes" / "starcoder2-3b" / "finetune_lora.yaml", bf16=False)
    with pytest.raises(RecipeError, match="unknown key 'lora_rank'"):
        recipe.set(lora_rank=8)
    with pytest.raises(RecipeError, match="lora_r: invalid int value"):
        recipe.set(lora_r="eight")
    assert recipe["lora_r"] == 16 and "lora_rank" not in recipe.values  # a refused change changes nothing
    model_args, _, _, _ = recipe.set(lora_r=4).arguments()
    assert model_args.lora_r == 4 and model_args.use_lora
    with pytest.raises(RecipeError, match="use_lora"):
        Recipe(ROOT / "recipes" / "tiny" / "pretrain.yaml").merge_adapter()


def test_a_lora_recipe_with_a_target_starcoder2_lacks_is_refused_before_training(base_and_code, tmp_path):
    from starcoder2_train import Recipe, ingest_code
    from starcoder2_train.configs import RecipeError

    root = base_and_code
    ingest_code(root / "code", tmp_path / "data")
    recipe = Recipe(
        ROOT / "recipes" / "starcoder2-3b" / "finetune_lora.yaml",
        model_name_or_path=str(root / "base"),
        tokenizer_name_or_path=str(root / "base"),
        dataset_name_or_path=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        lora_target_modules=["q_proj", "gate_proj"],
        **TINY,
    )
    with pytest.raises(RecipeError, match="gate_proj"):
        recipe.train()
    assert not (tmp_path / "out" / "adapter").exists()


def test_the_dry_run_of_a_lora_recipe_reports_trainable_parameters_and_memory(capsys, base_and_code):
    from starcoder2_train import Recipe

    root = base_and_code
    Recipe(
        ROOT / "recipes" / "starcoder2-3b" / "finetune_lora.yaml",
        model_name_or_path=str(root / "base"),
        tokenizer_name_or_path=str(root / "base"),
        seq_length=512,
        dry_run=True,
    ).dry_run()
    printed = capsys.readouterr().out
    assert "LoRA r 16 on q_proj, k_proj, v_proj, o_proj, c_fc, c_proj: trainable" in printed
    assert "memory per GPU with LoRA, GB: base_weights" in printed and "adapter_states" in printed


@pytest.mark.slow
def test_a_lora_run_saves_complete_checkpoints_and_resumes_from_them(base_and_code, tmp_path):
    """Checkpoints of a LoRA run hold the adapter and its optimizer state and pass verification; a restart of the
    same recipe from one continues with the uninterrupted run's losses."""
    from starcoder2_train import Recipe, ingest_code
    from starcoder2_train.training.checkpoints import newest_complete_checkpoint, verify_checkpoint

    root = base_and_code
    ingest_code(root / "code", tmp_path / "data")

    def recipe(output_dir, max_steps):
        values = dict(TINY, save_strategy="steps", save_steps=3, eval_fraction=0.0)
        return Recipe(
            ROOT / "recipes" / "starcoder2-3b" / "finetune_lora.yaml",
            model_name_or_path=str(root / "base"),
            tokenizer_name_or_path=str(root / "base"),
            dataset_name_or_path=str(tmp_path / "data"),
            output_dir=str(output_dir),
            max_steps=max_steps,
            **values,
        )

    def losses(output_dir):
        state = json.loads((output_dir / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    recipe(tmp_path / "whole", 6).train()
    checkpoint, skipped = newest_complete_checkpoint(str(tmp_path / "whole"))
    assert checkpoint == str(tmp_path / "whole" / "checkpoint-6") and skipped == [], skipped
    first = tmp_path / "whole" / "checkpoint-3"
    assert verify_checkpoint(str(first)) == []
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= set(os.listdir(first))
    # A restart from step 3 (another output_dir, the same recipe) trains steps 4-6 as the whole run did.
    recipe(tmp_path / "resumed", 6).train(resume_from_checkpoint=str(first))
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
