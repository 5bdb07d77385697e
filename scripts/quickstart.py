"""The embedded default run: StarCoder2's recipe in miniature, on the CPU, with nothing downloaded.

    python scripts/quickstart.py --output outputs/quickstart      (what `make quickstart` runs)

1. ingest the standard library of this Python into Stack v2-format parquet shards,
2. train a byte-level BPE tokenizer with StarCoder2's special tokens on them,
3. train recipes/tiny/pretrain.yaml (repository context, FIM 0.5, packed sequences),
4. load the saved model with transformers alone and infill a line of a held-out file.

Each step is printed as the command that runs it, so that any step can be rerun by hand.
"""

import json
import os
import shlex
import subprocess
import sys
import time

from starcoder2_train.cli import ScriptParser

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(step: str, words: list[str]) -> None:
    print(f"\n=== {step}\n$ {shlex.join(words)}", flush=True)
    start = time.perf_counter()
    subprocess.run(words, check=True, cwd=ROOT)
    print(f"=== {step}: done in {time.perf_counter() - start:.0f} s", flush=True)


def held_out_scores(model_dir: str) -> str:
    """The last held-out evaluation of the run (trainer_state.json's log), in words."""
    with open(os.path.join(model_dir, "trainer_state.json"), encoding="utf-8") as handle:
        logged = [entry for entry in json.load(handle)["log_history"] if "eval_fim/exact_match" in entry]
    if not logged:
        return "no held-out evaluation was logged (the recipe's eval_strategy is off)"
    last = logged[-1]
    hits = round(last["eval_fim/exact_match"] * last["eval_fim/problems"])
    loss = (
        f"loss {last['eval_loss/loss']:.2f} per token of {last['eval_loss/tokens']:,} tokens; "
        if "eval_loss/loss" in last  # eval_tasks without loss: only the FIM figure
        else ""
    )
    return (
        f"held-out at step {last['step']}: {loss}FIM exact match {hits} of {last['eval_fim/problems']} single-line "
        "problems (an untrained model scores 0)"
    )


def main(argv=None):
    parser = ScriptParser(description=__doc__)
    parser.add_argument("--output", default="outputs/quickstart", help="Directory for data, tokenizer and model.")
    parser.add_argument("--recipe", default="recipes/tiny/pretrain.yaml")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.epilog = "Any other --key value pair overrides the recipe's key for the training step (step 3)."
    # Overrides read apart (not a REMAINDER positional, which refuses one that comes first), their grammar checked
    # here: a stray word fails now, not after the ingest and the tokenizer.
    args, overrides = parser.parse_with_overrides(argv)
    data, tokenizer, model = (os.path.join(args.output, name) for name in ("data", "tokenizer", "model"))
    python = sys.executable
    start = time.perf_counter()
    # The stdlib's test suites are half of it and mostly fixtures: the tiny model learns more from the library.
    run(
        "1/4 ingest the standard library",
        [
            python,
            "scripts/ingest.py",
            "--output",
            data,
            "--exclude",
            "test",
            "--exclude",
            "tests",
            "--exclude",
            "idle_test",
        ],
    )
    run(
        "2/4 train the tokenizer",
        [
            python,
            "scripts/train_tokenizer.py",
            "--data",
            data,
            "--vocab_size",
            str(args.vocab_size),
            "--output",
            tokenizer,
        ],
    )
    run(
        "3/4 train the tiny model",
        [
            python,
            "scripts/run_pretrain.py",
            args.recipe,
            "--dataset_name_or_path",
            data,
            "--tokenizer_name_or_path",
            tokenizer,
            "--output_dir",
            model,
            *overrides,
        ],
    )
    run(
        "4/4 infill a held-out file with transformers alone",
        [python, "scripts/infill.py", model, "--recipe", args.recipe, "--dataset_name_or_path", data],
    )
    print(f"\n{held_out_scores(model)}")
    print(f"quickstart finished in {(time.perf_counter() - start) / 60:.1f} min; the model is in {model}")
    print(f"loss curve (train and eval loss against tokens, learning rate beneath): {model}/loss_curve.png")


if __name__ == "__main__":
    main()
