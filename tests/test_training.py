"""Training from recipes: the default recipe's loss falls and matches the stored curve, dry runs, bad recipes,
infilling."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import load_script, random_repositories, write_repository_shards

from starcoder2_train.configs import RecipeError

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "golden" / "tiny_pretrain_losses.json"


run_pretrain = load_script("run_pretrain")


def tiny_recipe(tmp_path, shards, tokenizer_dir, **overrides) -> list[str]:
    values = dict(
        model_config="test",
        torch_dtype="float32",
        attn_implementation="sdpa",
        dataset_name_or_path=shards,
        tokenizer_name_or_path=tokenizer_dir,
        seq_length=64,
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        warmup_steps=2,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=7,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    values.update(overrides)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return [str(recipe)]


def losses_of(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# What differs from recipes/tiny/pretrain.yaml in the golden run: the test's own data and tokenizer, and a
# short run logged at every step. Model, attention (auto), sequence length, batch, optimizer, schedule, FIM
# rates, filters, eval_fraction, num_proc and seed are the recipe's.
GOLDEN_OVERRIDES = dict(
    output_dir=None,  # the test's tmp_path
    max_steps=12,
    warmup_steps=2,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
)


def library_versions() -> dict:
    import accelerate
    import datasets
    import tokenizers
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        **{module.__name__: module.__version__ for module in (torch, transformers, accelerate, datasets, tokenizers)},
    }


def test_loss_falls_and_matches_the_golden_curve(tmp_path, code_shards, tokenizer_dir, caplog):
    overrides = dict(GOLDEN_OVERRIDES, output_dir=str(tmp_path / "out"))
    words = [str(ROOT / "recipes" / "tiny" / "pretrain.yaml"), "--dataset_name_or_path", code_shards]
    words += ["--tokenizer_name_or_path", tokenizer_dir]
    for key, value in overrides.items():
        words += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    trainer = run_pretrain.main(words)
    assert trainer.model.config._attn_implementation == "sdpa_blocked"  # the recipe's auto, on a CPU
    # The data report is in the run's output at the default log_level (passive): the window FIM and the skips.
    logged = [record.getMessage() for record in caplog.records if record.name == "starcoder2_train.run"]
    assert any(line.startswith("data: FIM per window (fim_level: window)") for line in logged), logged
    assert any(line.startswith("data: packing efficiency") for line in logged)
    losses = losses_of(trainer)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    if os.environ.get("UPDATE_GOLDEN") == "1":
        record = {
            "recipe": "recipes/tiny/pretrain.yaml",
            "overrides": GOLDEN_OVERRIDES,
            "made_with": library_versions(),
        }
        GOLDEN.write_text(json.dumps({**record, "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    changed = {
        k: (v, library_versions().get(k)) for k, v in golden["made_with"].items() if library_versions().get(k) != v
    }
    assert losses == pytest.approx(golden["losses"], rel=2e-3), (
        "training changed: rerun with UPDATE_GOLDEN=1 if intended"
        + (f"; libraries differ from the golden run (recorded, now): {changed}" if changed else "")
    )
    # The output is a plain Hugging Face model directory.
    names = set(os.listdir(tmp_path / "out"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "loss_curve.png"} <= names


def test_trained_model_infills_with_transformers_alone(tmp_path, tokenizer_dir):
    # Small repositories of short files: the model quickly learns where a middle ends.
    repos = random_repositories(200, seed=21, max_files=2)
    for repo in repos:
        for f in repo["files"]:
            f["content"] = f["content"].split("\n", 2)[0] + "\n"
    shards = write_repository_shards(tmp_path / "shards", repos, num_files=1)
    run_pretrain.main(
        tiny_recipe(
            tmp_path,
            shards,
            tokenizer_dir,
            max_steps=300,
            learning_rate=3e-3,
            fim_rate=1.0,
            repo_metadata_rate=0.0,
            fim_fragment_rate=1.0,
            per_device_train_batch_size=8,
        )
    )
    program = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(tmp_path / "out")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out")!r}).eval()
        ids = lambda s: tok(s, add_special_tokens=False, split_special_tokens=True).input_ids
        t = tok.convert_tokens_to_ids
        stops = [t("<|endoftext|>"), t("<file_sep>")]
        prompt = [t("<file_sep>"), t("<fim_prefix>"), *ids("def add(a, b"), t("<fim_suffix>"), *ids(" a + b\\n"),
                  t("<fim_middle>")]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[0])[0, len(prompt):].tolist()
        print("GENERATED", len(out), out[-1] in stops, repr(tok.decode(out)))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")  # transformers alone: no project code importable
    result = subprocess.run(
        [sys.executable, "-I", "-c", program], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("GENERATED"))
    _, count, stopped, _text = line.split(" ", 3)
    assert int(count) >= 2 and stopped == "True", line

    # scripts/infill.py on the same model, in both prompt orders: the hole opens with a newline (token healing).
    source = tmp_path / "f.py"
    source.write_text("".join(f"def f{i}(a, b):\n    return a + b\n" for i in range(6)))
    for mode in ("psm", "spm"):
        shown = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "infill.py"), str(tmp_path / "out"), "--file", str(source)]
            + ["--mode", mode, "--seed", "3"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert f"({mode.upper()} prompt)" in shown.stdout and "----- expected: " in shown.stdout
        assert "without a newline first" not in shown.stdout, shown.stdout  # healed: the hole opened a line


@pytest.mark.parametrize(
    "recipe,expected",
    [
        (
            "starcoder2-3b/pretrain.yaml",
            {
                "parameters": 3_030_371_328,
                "num_hidden_layers": 30,
                "hidden_size": 3072,
                "num_attention_heads": 24,
                "num_key_value_heads": 2,
                "intermediate_size": 12288,
            },
        ),
        (
            "starcoder2-7b/pretrain.yaml",
            {
                "parameters": 7_173_923_840,
                "num_hidden_layers": 32,
                "hidden_size": 4608,
                "num_attention_heads": 36,
                "num_key_value_heads": 4,
                "intermediate_size": 18432,
            },
        ),
        (
            "starcoder2-15b/pretrain.yaml",
            {
                "parameters": 15_957_889_024,
                "num_hidden_layers": 40,
                "hidden_size": 6144,
                "num_attention_heads": 48,
                "num_key_value_heads": 4,
                "intermediate_size": 24576,
            },
        ),
    ],
)
def test_dry_run_reports_the_released_model(recipe, expected, tokenizer_dir, tmp_path, capsys):
    assert (
        run_pretrain.main(
            [
                str(ROOT / "recipes" / recipe),
                "--dry_run",
                "true",
                "--tokenizer_name_or_path",
                tokenizer_dir,
                "--dataset_name_or_path",
                str(tmp_path),
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )
        is None
    )
    printed = capsys.readouterr().out
    assert f"parameters: {expected.pop('parameters'):,}" in printed
    config = json.loads(next(line for line in printed.splitlines() if line.startswith("config: "))[len("config: ") :])
    for key, value in expected.items():
        assert config[key] == value, key
    assert (config["vocab_size"], config["sliding_window"], config["max_position_embeddings"]) == (49152, 4096, 16384)
    assert "tokens per optimizer step" in printed and "memory per GPU" in printed
    assert not os.path.exists(tmp_path / "o")  # nothing trained, nothing written


def test_long_context_recipe_sets_16k_and_rope_theta(tmp_path, tokenizer_dir, capsys):
    from starcoder2_train.recipe import RecipeParser

    model_args, data_args, _ = RecipeParser().parse(
        [str(ROOT / "recipes/starcoder2-3b/long_context.yaml"), "--dry_run", "true"]
    )
    assert (data_args.seq_length, model_args.rope_theta, model_args.max_position_embeddings) == (16384, 1e6, 16384)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--seq_lenght", "64"], "unknown key 'seq_lenght' in the command line. Did you mean 'seq_length'?"),
        (["--seq_length", "5000"], "seq_length: 5000 exceeds the model's max_position_embeddings"),
        (["--fim_rate", "1.5"], "fim_rate: must be a probability"),
        (
            ["--model_config", "starcoder2-3b", "--tokenizer_name_or_path", "LARGE"],
            "tokenizer_name_or_path: the tokenizer has",
        ),
        (["--tokenizer_name_or_path", "NOFIM"], "lacks the special token"),
        (["--attn_implementation", "flash"], "attn_implementation: 'flash' is not one of"),
    ],
)
def test_bad_recipes_fail_before_training_naming_the_key(overrides, message, tmp_path, code_shards, tokenizer_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = []
    for word in overrides:
        if word in ("LARGE", "NOFIM"):
            backend = Tokenizer(models.BPE())
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokens = ["<|endoftext|>"] + (
                ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>"]
                + [f"<extra_{i}>" for i in range(50_000)]
                if word == "LARGE"
                else []
            )
            backend.add_special_tokens(tokens)
            PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(
                tmp_path / word
            )
            word = str(tmp_path / word)
        words.append(word)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        run_pretrain.main(tiny_recipe(tmp_path, code_shards, tokenizer_dir) + words)
    assert not os.path.exists(tmp_path / "out")


def test_recipe_evaluates_writes_a_model_card_and_dry_runs_the_upload(tmp_path, code_shards, tokenizer_dir):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    trainer = run_pretrain.main(
        tiny_recipe(
            tmp_path,
            code_shards,
            tokenizer_dir,
            max_steps=6,
            eval_fraction=0.2,
            eval_strategy="steps",
            eval_steps=3,
            fim_eval_problems=8,
            push_to_hub=True,
            hub_model_id="me/tiny-starcoder2",
            hub_dry_run_dir=str(tmp_path / "upload"),
        )
    )
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"eval_loss", "eval_loss/loss", "eval_fim/exact_match"} <= logged
    assert any(key.startswith("eval_loss/loss/") for key in logged)  # per language
    upload = tmp_path / "upload"
    card = ModelCard.load(upload / "README.md")
    assert card.data.model_name == "me/tiny-starcoder2" and card.data.eval_results
    assert "<fim_prefix>" in card.text and "fim_rate" in card.text
    assert "](loss_curve.png)" in card.text and (upload / "loss_curve.png").exists()  # the picture goes with it
    assert not (upload / "optimizer.pt").exists()
    AutoModelForCausalLM.from_pretrained(upload)  # the uploaded folder is a loadable model
    # Saved for generation (cache on), evaluated packed (cache off: with a cache packed documents would mix).
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_cache"] is True
    assert trainer.model.config.use_cache is False


def test_push_without_hub_model_id_fails_before_work(tmp_path, code_shards, tokenizer_dir):
    with pytest.raises(RecipeError, match="hub_model_id: push_to_hub needs"):
        run_pretrain.main(tiny_recipe(tmp_path, code_shards, tokenizer_dir, push_to_hub=True))
    assert not (tmp_path / "out").exists()
