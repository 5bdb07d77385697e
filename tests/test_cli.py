"""One command-line convention for every script (starcoder2_train/cli.py).

Booleans take `--flag` alone and `--flag true|false|yes|no|1|0` in every script, as recipe keys do; a word a
script cannot read is one `error: ... (see SCRIPT.py --help)` line on stderr with exit status 2, never a usage
block or a traceback. The subprocess tests run the real scripts; each parses before it imports transformers
(evaluate.py excepted), so a refusal costs a fraction of a second.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LAUNCH_ENV, load_script

from starcoder2_train.cli import ScriptParser, parse_overrides
from starcoder2_train.configs import RecipeError
from starcoder2_train.recipe import CommandLineError, RecipeParser

ROOT = Path(__file__).parents[1]
RECIPE = "recipes/tiny/pretrain.yaml"

# Each script: the words that satisfy its required arguments, and what --disable_tqdm is to it: its own option
# ("own"), a recipe key passed on to RecipeParser ("recipe"), or an option it does not have (None).
SCRIPTS = {
    "benchmark": ([], "recipe"),
    "benchmark_data": ([], None),
    "benchmark_data_position": ([], None),
    "benchmark_eval": ([], None),
    "device_check": ([], None),
    "device_setup": (["install"], None),
    "download_stack_v2": (["ids.parquet", "--output", "out"], "own"),
    "evaluate": (["model", "--data", "shards"], "own"),
    "infill": (["model", "--recipe", RECIPE], "recipe"),
    "ingest": (["--output", "out"], "own"),
    "inspect_data": ([RECIPE], "recipe"),
    "merge_adapter": (["adapter", "--output", "out"], None),
    "prepare_data": ([RECIPE, "--output", "out"], "own"),
    "quickstart": ([], "recipe"),
    "run_pretrain": ([RECIPE], "recipe"),
    "run_sft": ([RECIPE], "recipe"),
    "train_tokenizer": (["--data", "shards", "--vocab_size", "300", "--output", "out"], "own"),
}
OWN_FLAG = [name for name, (_, kind) in SCRIPTS.items() if kind == "own"]


def run(script: str, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *words],
        cwd=ROOT,
        env=LAUNCH_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_error_line(process: subprocess.CompletedProcess, script: str) -> str:
    """Exit status 2 and exactly one stderr line, `error: ... (see SCRIPT.py --help)`; no traceback."""
    assert "Traceback" not in process.stdout + process.stderr, process.stderr[-3000:]
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, (process.returncode, process.stderr[-3000:])
    assert lines[0].startswith("error: ") and lines[0].endswith(f"(see {script}.py --help)"), lines[0]
    return lines[0]


def test_every_script_follows_the_convention():
    """A new script joins SCRIPTS."""
    names = {path.stem for path in (ROOT / "scripts").glob("*.py")}
    assert names == set(SCRIPTS)


def stray(script: str) -> str:
    """A word the script cannot read (for ingest every bare word is a PATH: an unknown option instead)."""
    return "--no_such_option" if script == "ingest" else "stray_word"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_stray_word_is_one_error_line(script):
    base, _ = SCRIPTS[script]
    message = one_error_line(run(script, *base, stray(script)), script)
    assert stray(script) in message


@pytest.mark.parametrize("value", [[], ["true"]], ids=["bare", "true"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_disable_tqdm_bare_and_with_a_value(script, value):
    base, kind = SCRIPTS[script]
    words = [*base, "--disable_tqdm", *value]
    if kind == "recipe":  # the words go to RecipeParser (tested below, in-process); --help ends the parse at once
        process = run(script, *words, "--help")
        assert process.returncode == 0 and process.stdout.startswith("usage: "), process.stderr[-3000:]
        return
    message = one_error_line(run(script, *words, stray(script)), script)
    assert stray(script) in message
    if kind == "own":  # "true" was the flag's value: only the stray word is left over
        assert "true" not in message and "--disable_tqdm" not in message, message
    else:  # refused in the same line
        assert f"unrecognized arguments: {' '.join(words[len(base) :])} {stray(script)}" in message, message


@pytest.mark.parametrize("script", OWN_FLAG)
def test_disable_tqdm_values_in_each_script(script):
    """The value is read in-process through each script's parse_args: bare, each word, absent."""
    base, _ = SCRIPTS[script]
    parse_args = load_script(script).parse_args

    def disable_tqdm(*words):
        parsed = parse_args([*base, *words])
        return (parsed[0] if isinstance(parsed, tuple) else parsed).disable_tqdm

    assert disable_tqdm() is False and disable_tqdm("--disable_tqdm") is True
    for word, expected in (("true", True), ("yes", True), ("1", True), ("false", False), ("no", False), ("0", False)):
        assert disable_tqdm("--disable_tqdm", word) is expected
        assert disable_tqdm(f"--disable_tqdm={word.upper()}") is expected


def test_a_bare_flag_leaves_the_next_word_to_the_positionals(capsys):
    parser = ScriptParser(prog="x.py")
    parser.add_argument("paths", nargs="*")
    parser.add_flag("--overwrite")
    args = parser.parse_args(["--overwrite", "src", "lib"])
    assert args.overwrite is True and args.paths == ["src", "lib"]
    args = parser.parse_args(["src", "--overwrite", "no"])
    assert args.overwrite is False and args.paths == ["src"]
    with pytest.raises(SystemExit) as raised:
        parser.parse_args(["--overwrite=maybe"])
    assert raised.value.code == 2
    assert capsys.readouterr().err == (
        "error: argument --overwrite: expected true or false (yes/no, 1/0), got 'maybe' (see x.py --help)\n"
    )


def test_recipe_booleans_take_the_same_words():
    for words, expected in ((["--disable_tqdm"], True), (["--disable_tqdm", "no"], False)):
        assert RecipeParser().parse([RECIPE, *words])[2].disable_tqdm is expected
    assert RecipeParser().parse([RECIPE, "--disable_tqdm=1"])[2].disable_tqdm is True
    assert parse_overrides(["--a", "--b=0", "--c", "1", "2"]) == {"a": "true", "b": "0", "c": ["1", "2"]}


@pytest.mark.parametrize(
    "words,message",
    [
        (["stray"], "command line: 'stray' is not preceded by a --key"),
        (["--seed", "1", "2"], r"seed: takes one value, got 2 \(1 2\) in the command line"),
        (["--sead", "1"], "unknown key 'sead' in the command line. Did you mean 'seed'?"),
        (["--seed", "x"], r"seed: invalid int value: 'x' \(in the command line\)"),
    ],
)
def test_command_line_mistakes_are_command_line_errors(words, message):
    """A mistake written on the command line is a CommandLineError (exit status 2 in the scripts), still a
    RecipeError for the Python API; `--seed 1 2` was HfArgumentParser's ValueError, a traceback."""
    with pytest.raises(CommandLineError, match=message):
        RecipeParser().parse([RECIPE, *words])


def test_a_mistake_in_the_recipe_file_is_a_recipe_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(Path(ROOT / RECIPE).read_text() + "sead: 1\n")
    with pytest.raises(RecipeError, match="unknown key 'sead' in recipe") as raised:
        RecipeParser().parse([str(path)])
    assert not isinstance(raised.value, CommandLineError)
    path.write_text(Path(ROOT / RECIPE).read_text() + "seed: [1, 2]\n")
    with pytest.raises(RecipeError, match="seed: takes one value, got 2") as raised:
        RecipeParser().parse([str(path)])
    assert not isinstance(raised.value, CommandLineError)
