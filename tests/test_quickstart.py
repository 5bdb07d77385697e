"""`make quickstart`, the README's first command, end to end as a new user runs it: scripts/quickstart.py ingests
this Python's standard library, trains the tokenizer and the tiny recipe (shortened here by the overrides the
script passes on to training), infills a held-out line and prints where the loss curve is."""

import json
import os
import subprocess
import sys

import pytest
from conftest import LAUNCH_ENV
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_end_to_end_with_overrides_passed_to_training(tmp_path):
    out = tmp_path / "quickstart"
    # The overrides come first on the command line, as a user adds them after --output: all reach training.
    command = [sys.executable, "scripts/quickstart.py", "--output", str(out), "--max_steps", "6"]
    command += ["--eval_steps", "6", "--save_steps", "6", "--warmup_steps", "2", "--fim_eval_problems", "12"]
    done = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout
    for step in ("1/4 ingest", "2/4 train the tokenizer", "3/4 train the tiny model", "4/4 infill"):
        assert f"=== {step}" in printed, step
    model_dir = out / "model"
    state = json.loads((model_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["max_steps"] == 6
    # The evaluation the override moved to step 6 ran and its scores are printed in words.
    assert "held-out at step 6: loss " in printed and " of 12 single-line problems" in printed
    # The infill shows what was expected next to what the model wrote.
    assert "----- expected: " in printed and "----- generated: " in printed
    curve = model_dir / "loss_curve.png"
    assert f"{curve}" in printed and curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The output is a plain Hugging Face model directory.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.model_type == "starcoder2" and "<fim_middle>" in tokenizer.get_vocab()
