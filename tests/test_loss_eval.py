"""Held-out loss per language, and scripts/evaluate.py end to end."""

import importlib.util
import json
import math
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard

from starcoder2_train.configs import ModelArguments
from starcoder2_train.evaluation.loss import evaluate_loss, windows
from starcoder2_train.hub.model_card import write_model_card
from starcoder2_train.model.factory import create_model

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "evaluate.py")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return create_model(
        ModelArguments(model_config="test", torch_dtype="float32", attn_implementation="eager", sliding_window=1024),
        tokenizer=tokenizer,
    )


@pytest.mark.parametrize("length", [1, 2, 7, 8, 9, 15, 16, 50])
def test_windows_predict_every_token_once(length):
    ids = list(range(length))
    pieces = windows(ids, seq_length=8)
    assert all(len(piece) <= 8 for piece in pieces)
    targets = [token for piece in pieces for token in piece[1:]]
    assert targets == ids[1:]
    assert all(piece[0] == previous[-1] for previous, piece in zip(pieces, pieces[1:]))


def reference_loss(model, rows):
    """Mean token loss of each row scored alone, whole, by transformers' own loss."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        total += model(input_ids=ids, labels=ids).loss.item() * (len(row["input_ids"]) - 1)
        count += len(row["input_ids"]) - 1
    return total / count


def test_loss_per_language_equals_scoring_each_row_alone(model):
    rows = Dataset.from_list(
        [
            {"input_ids": list(range(40, 90)), "language": "Python"},
            {"input_ids": list(range(100, 120)), "language": "Python"},
            {"input_ids": list(range(200, 233)), "language": "Rust"},
            {"input_ids": [5], "language": "Rust"},  # nothing to predict: adds no token
        ]
    )
    metrics = evaluate_loss(model, rows, seq_length=64, batch_size=2)
    python, rust = rows.select([0, 1]), rows.select([2])
    assert metrics["loss/Python"] == pytest.approx(reference_loss(model, python), rel=1e-5)
    assert metrics["loss/Rust"] == pytest.approx(reference_loss(model, rust), rel=1e-5)
    assert metrics["loss"] == pytest.approx(reference_loss(model, rows.select([0, 1, 2])), rel=1e-5)
    assert metrics["tokens"] == 49 + 19 + 32 and metrics["tokens/Rust"] == 32
    assert metrics["perplexity/Rust"] == pytest.approx(math.exp(metrics["loss/Rust"]))
    assert metrics == evaluate_loss(model, rows, seq_length=64, batch_size=4)  # padding does not matter
    windowed = evaluate_loss(model, rows, seq_length=16, batch_size=3)
    assert windowed["tokens"] == metrics["tokens"]  # the same tokens, with shorter contexts


def test_nothing_to_score_is_a_clear_error(model):
    with pytest.raises(ValueError, match="nothing to predict"):
        evaluate_loss(model, [{"input_ids": [1], "language": "Python"}], seq_length=8)


HELD_OUT_FILES = [
    [
        {"path": "a.py", "content": "def add(a, b):\n    return a + b\n", "language": "Python"},
        {"path": "b.js", "content": "function f(x) {\n  return x * 2;\n}\n", "language": "JavaScript"},
    ],
    [{"path": "c.py", "content": "import os\n\nprint(os.getcwd())\n", "language": "Python"}],
]


HELD_OUT_REPOS = ["owner/one", "owner/two"]


def write_held_out_shard(path):
    table = pa.table({"repo_name": HELD_OUT_REPOS, "files": HELD_OUT_FILES})
    os.makedirs(path)
    pq.write_table(table, os.path.join(path, "held-out.parquet"))


def test_evaluate_script_end_to_end(model, tokenizer, tmp_path, monkeypatch):
    model_dir, data_dir, output = tmp_path / "model", tmp_path / "data", tmp_path / "results.json"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_model_card(str(model_dir), {"model_config": "test", "dataset_name_or_path": str(data_dir)})
    write_held_out_shard(str(data_dir))
    # As `python scripts/evaluate.py` runs it: its folder first on sys.path, the `evaluate` library not yet imported.
    monkeypatch.syspath_prepend(os.path.dirname(SCRIPT))
    monkeypatch.delitem(sys.modules, "evaluate", raising=False)
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(PermissionError, match="HF_ALLOW_CODE_EVAL"):
        script.main([str(model_dir), "--tasks", "humaneval"])
    with pytest.raises(SystemExit):
        script.main([str(model_dir), "--tasks", "loss"])  # no --data
    with pytest.raises(SystemExit):
        script.main([str(model_dir), "--tasks", "fim", "--data", str(data_dir), "--fim_lines_per_file", "0"])

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    results = script.main(
        [
            str(model_dir),
            "--tasks",
            "loss,fim,humaneval",
            "--data",
            str(data_dir),
            "--limit",
            "2",
            "--max_new_tokens",
            "8",
            "--num_samples",
            "2",
            "--k",
            "1,2",
            "--num_workers",
            "2",
            "--device",
            "cpu",
            "--output",
            str(output),
            "--fim_predictions",
            str(tmp_path / "fim.jsonl"),
            "--update_model_card",
        ]
    )
    written = json.loads(output.read_text())
    assert written["results"] == results and set(written["seconds"]) == {"loss", "fim", "humaneval"}
    assert set(results["loss"]) >= {"loss/Python", "loss/JavaScript", "perplexity"}
    assert results["fim"]["problems/Python"] == 2 and results["humaneval"]["problems"] == 2
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")  # the per-language chart beside the JSON
    # One row per FIM problem, naming the masked line of the held-out file and what the model wrote there.
    rows = [json.loads(line) for line in (tmp_path / "fim.jsonl").read_text().splitlines()]
    contents = {
        f"{repo}/{file['path']}": file["content"]
        for repo, files in zip(HELD_OUT_REPOS, HELD_OUT_FILES)
        for file in files
    }
    assert len(rows) == results["fim"]["problems"] == 3
    for row in rows:
        assert contents[row["path"]].splitlines()[row["line"] - 1] == row["expected"]
        assert row["generated"] is None or isinstance(row["generated"], str)
    assert sum(row["exact_match"] for row in rows) == round(results["fim"]["exact_match"] * len(rows))
    card = ModelCard.load(model_dir / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"loss", "perplexity", "exact_match", "pass@1", "pass@2"}


def test_training_and_the_script_score_the_same_held_out_rows(tmp_path, code_shards, tokenizer_dir, monkeypatch):
    """One meaning of held-out loss: what training logs equals what scripts/evaluate.py --recipe prints."""
    from conftest import load_script

    recipe = tmp_path / "recipe.yaml"
    values = dict(
        model_config="test",
        attn_implementation="sdpa",
        dataset_name_or_path=code_shards,
        tokenizer_name_or_path=tokenizer_dir,
        seq_length=64,
        eval_fraction=0.2,
        eval_strategy="steps",
        eval_steps=3,
        eval_tasks=["loss", "fim"],
        fim_eval_problems=5,
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
    )
    recipe.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    trainer = load_script("run_pretrain").main([str(recipe)])
    (callback,) = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "EvaluationCallback"]
    during_training = callback.latest_results
    logged = [entry for entry in trainer.state.log_history if "eval_loss/loss" in entry]
    assert logged and logged[-1]["eval_loss/loss"] == during_training["loss"]["loss"]

    monkeypatch.syspath_prepend(os.path.dirname(SCRIPT))
    monkeypatch.delitem(sys.modules, "evaluate", raising=False)
    spec = importlib.util.spec_from_file_location("evaluate_script_recipe", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    after = script.main([str(tmp_path / "out"), "--recipe", str(recipe), "--tasks", "loss,fim", "--device", "cpu"])
    assert set(after["loss"]) == set(during_training["loss"]) and after["loss"]["tokens"] > 0
    for key, value in during_training["loss"].items():
        assert after["loss"][key] == pytest.approx(value, rel=1e-5), key
    assert after["fim"]["problems"] == during_training["fim"]["problems"] == 5
    assert after["fim"]["exact_match"] == during_training["fim"]["exact_match"]
    # --fim_lines_per_file, given, wins over the recipe's fim_eval_lines_per_file (1 here).
    uncapped = [str(tmp_path / "out"), "--recipe", str(recipe), "--tasks", "fim", "--fim_eval_problems", "1000"]
    one, three = (script.main(uncapped + ["--fim_lines_per_file", lines])["fim"]["problems"] for lines in ("1", "3"))
    assert 5 < one < three
    card = (tmp_path / "out" / "README.md").read_text()
    assert "What was measured" in card and "scored alone as `<file_sep>code<|endoftext|>`" in card
