"""Reading a recipe: a YAML file plus `--key value` overrides → ModelArguments, DataArguments, PretrainingArguments.

`RecipeParser().parse(["recipe.yaml", "--learning_rate", "2e-4"])` returns the three dataclasses of configs/.
Unknown keys, on the command line or in the file, fail at once with the key and where it was written (and the
closest known key); a value argparse cannot read names the recipe. `tokenizer_name_or_path` defaults to
`model_name_or_path` here, in one place. The command-line grammar (`--key value`, `--key=value`, `--key v1 v2`,
`--key` alone: true) is cli.parse_overrides; a mistake written on the command line is a CommandLineError, which
the scripts report with exit status 2 (cli.fail), one in the recipe file a RecipeError (exit status 1).
"""

import dataclasses
import difflib
import json
import os
import sys

import yaml
from transformers import HfArgumentParser

from starcoder2_train.cli import UsageError, parse_overrides
from starcoder2_train.configs import DataArguments, ModelArguments, PretrainingArguments, RecipeError
from starcoder2_train.training.cpu_fallback import CpuFallback, fit_to_machine

__all__ = ["CommandLineError", "RecipeParser", "parse_overrides", "to_words"]


class CommandLineError(RecipeError, UsageError):
    """A recipe key or word written on the command line that cannot be read (a RecipeError; scripts exit 2)."""


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _to_argv(key: str, value) -> list[str]:
    """Render one recipe value as command-line words for HfArgumentParser."""
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *[json.dumps(item) if isinstance(item, dict) else str(item) for item in value]]
    if isinstance(value, dict):
        return [f"--{key}", json.dumps(value)]
    return [f"--{key}", str(value)]


def to_words(values: dict) -> list[str]:
    """Recipe values as `--key value` words (None: left unset, the key's default)."""
    words = []
    for key, value in values.items():
        if value is not None:
            words += _to_argv(key, value)
    return words


class RecipeParser(HfArgumentParser):
    """Parse a recipe YAML and `--key value` overrides into (ModelArguments, DataArguments, PretrainingArguments)."""

    def __init__(self):
        super().__init__((ModelArguments, DataArguments, PretrainingArguments))
        self.dry_run_bf16 = None  # the recipe's bf16 when a dry run without a GPU had to drop it
        self.cpu_fallback = CpuFallback()  # what a machine without CUDA changed (training/cpu_fallback.py)
        self.known_keys = {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.init}

    def load(self, recipe_path: str | os.PathLike | None, override_words: list[str]) -> dict:
        """The merged recipe: the YAML's keys, then the command line's, with unknown keys refused."""
        values = {}
        if recipe_path is not None:
            if not os.path.isfile(recipe_path):
                raise RecipeError(f"recipe {recipe_path}: no such file.")
            with open(recipe_path) as handle:
                try:
                    values = yaml.safe_load(handle) or {}
                except yaml.YAMLError as error:
                    raise RecipeError(f"recipe {recipe_path}: not valid YAML: {error}") from error
            if not isinstance(values, dict):
                raise RecipeError(f"recipe {recipe_path}: must be a mapping of key: value lines.")
        where = {key: f"recipe {recipe_path}" for key in values}
        try:
            overrides = parse_overrides(override_words)
        except UsageError as error:
            raise CommandLineError(f"command line: {error}") from None
        for key, value in overrides.items():
            values[key], where[key] = value, "the command line"
        # Data named on the command line replaces the recipe file's: --dataset_name_or_path drops the file's
        # dataset_mixture (a quick run of a mixture recipe on one folder), --dataset_mixture its dataset_name_or_path.
        for given, dropped in (
            ("dataset_name_or_path", "dataset_mixture"),
            ("dataset_mixture", "dataset_name_or_path"),
        ):
            if where.get(given) == "the command line" and where.get(dropped, "").startswith("recipe"):
                del values[dropped], where[dropped]
        self.where = where
        for key, value in values.items():
            if key not in self.known_keys:
                raise self._error(key, f"unknown key '{key}' in {where[key]}.{_suggest(key, self.known_keys)}")
            action = self._option_string_actions.get(f"--{key}")
            if isinstance(value, (list, tuple)) and action is not None and action.nargs not in ("+", "*"):
                words = " ".join(str(item) for item in value)
                raise self._error(key, f"{key}: takes one value, got {len(value)} ({words}) in {where[key]}.")
        # Without a CUDA GPU the GPU-only keys are changed, or refused, in one place: training/cpu_fallback.py (a dry
        # run only takes bf16 out, kept in dry_run_bf16 for its plan).
        explicit = [key for key, place in where.items() if place == "the command line"]
        self.cpu_fallback = fit_to_machine(values, explicit)
        self.dry_run_bf16 = self.cpu_fallback.dry_run_bf16
        return values

    def _error(self, key: str, message: str) -> RecipeError:
        """A CommandLineError where the key was written on the command line, else a RecipeError."""
        on_command_line = getattr(self, "where", {}).get(key) == "the command line"
        return (CommandLineError if on_command_line else RecipeError)(message)

    def error(self, message: str):
        """argparse's refusal of a value ("argument --seq_length: invalid int value: 'long'") as a RecipeError
        naming the key and where it was written, instead of the usage of every key and an exit."""
        key, _, reason = message.removeprefix("argument ").partition(": ")
        key = key.split("/")[0].strip().removeprefix("--")
        if not reason or key not in self.known_keys:
            raise RecipeError(f"recipe: {message}")
        where = getattr(self, "where", {}).get(key, "the recipe")
        raise self._error(
            key,
            f"{key}: {reason} (in {where}). Write a value of the key's type; each key's type and help are in "
            "src/starcoder2_train/configs/.",
        )

    def parse(self, argv: list[str] | None = None):
        """argv: [RECIPE.yaml] [--key value ...]; defaults to sys.argv[1:]."""
        argv = list(sys.argv[1:] if argv is None else argv)
        recipe = argv.pop(0) if argv and not argv[0].startswith("--") else None
        values = self.load(recipe, argv)
        self.recipe_values = dict(values)  # for the model card
        words = to_words(values)
        try:
            model_args, data_args, *rest = self.parse_args_into_dataclasses(args=words, look_for_args_file=False)
        except SystemExit as error:  # argparse exits on a bad value; say which key instead
            raise RecipeError(f"recipe {recipe}: a value could not be parsed (see the message above).") from error
        except ValueError as error:  # words HfArgumentParser left over (load() refuses the ones it can foresee)
            if isinstance(error, RecipeError) or "not used by the HfArgumentParser" not in str(error):
                raise
            raise CommandLineError(f"recipe {recipe} and command line: {error}") from None
        if data_args.tokenizer_name_or_path is None:  # a checkpoint's own tokenizer, the one default of this key
            data_args.tokenizer_name_or_path = model_args.model_name_or_path
        return model_args, data_args, *rest
