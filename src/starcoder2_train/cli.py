"""The one command-line convention of every script in scripts/; standard library only, so a script parses (and
refuses a mistyped word) before it imports torch or transformers.

- Booleans: `--flag` alone means true; `--flag VALUE` and `--flag=VALUE` take yes/no, true/false, t/f, y/n, 1/0 in
  any case: the words transformers' HfArgumentParser accepts for a recipe's bool key (`string_to_bool`, read in
  transformers 5.25's hf_argparser.py), so `--disable_tqdm true` means the same in every script. A word after a
  bare flag that is none of these stays what it is (a positional such as a path).
- Recipe overrides: `--key value`, `--key=value`, `--key v1 v2` (a list) and `--key` alone (true);
  `parse_overrides` reads them, for RecipeParser and for the scripts that pass them on.
- Mistakes on the command line (an unknown option, a stray word, a value of the wrong type): one line on stderr,
  `error: MESSAGE (see SCRIPT --help)`, exit status 2, as argparse's own status for usage errors; no usage block,
  no traceback. A bad recipe file, input or path is the script's own `error: MESSAGE` line, exit status 1.
"""

import argparse
import os
import sys
from typing import NoReturn

TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")


class UsageError(ValueError):
    """A word on the command line that cannot be read; a script reports it with exit status 2."""


def to_bool(text: str | bool) -> bool:
    """A boolean option's value (TRUE_WORDS or FALSE_WORDS, any case), for argparse's `type=`."""
    if isinstance(text, bool):
        return text
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (yes/no, 1/0), got '{text}'")


def parse_overrides(words: list[str]) -> dict:
    """`--key value`, `--key=value`, `--key v1 v2` (a list) and `--key` alone ("true") into a dict of strings;
    a word that no `--key` comes before is refused with a UsageError."""
    overrides, key = {}, None
    for word in words:
        if word.startswith("--"):
            key, sep, value = word[2:].partition("=")
            if not key:
                raise UsageError(f"'{word}' names no key; write --key value.")
            overrides[key] = [value] if sep else []
        elif key is None:
            raise UsageError(f"'{word}' is not preceded by a --key; write --key value.")
        else:
            overrides[key].append(word)
    return {k: (v[0] if len(v) == 1 else v if v else "true") for k, v in overrides.items()}


def script_name() -> str:
    """The running script's file name, for the `(see NAME --help)` hint."""
    return os.path.basename(sys.argv[0]) or "the script"


def usage_line(message: str, prog: str | None = None) -> str:
    return f"error: {message.rstrip('.')} (see {prog or script_name()} --help)"


def fail(error: Exception) -> NoReturn:
    """End a script on an error whose message says what to do: one `error:` line on stderr; exit status 2 for a
    UsageError (a command-line mistake, with the --help hint), 1 for anything else (a bad recipe, input or path)."""
    if isinstance(error, UsageError):
        print(usage_line(str(error)), file=sys.stderr)
        raise SystemExit(2)
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(1)


def run_script(main) -> None:
    """Run a script's main(): a UsageError or a RecipeError (whose message says what to do) ends in fail();
    any other error keeps its traceback. configs is imported only then: a script parses before transformers."""
    try:
        main()
    except ValueError as error:
        from starcoder2_train.configs import RecipeError

        if not isinstance(error, (UsageError, RecipeError)):
            raise
        fail(error)


class ScriptParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with this project's convention: `add_flag` for booleans, one-line errors (exit 2),
    no abbreviations (`--out` is not `--output`), and `parse_with_overrides` for scripts that pass `--key value`
    recipe overrides on."""

    def __init__(self, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        self.flags = set()

    def add_flag(self, name: str, help: str | None = None, default: bool = False):
        """A boolean option: `--name` alone is true, `--name VALUE` / `--name=VALUE` read with to_bool."""
        self.flags.add(name)
        return self.add_argument(
            name, type=to_bool, nargs="?", const=True, default=default, metavar="true|false", help=help
        )

    def _joined_flags(self, words: list[str]) -> list[str]:
        """`--flag WORD` as `--flag=WORD` when WORD is a boolean word, else `--flag=true` with WORD left alone:
        argparse's nargs="?" would take any next word (a path) as the flag's value."""
        joined, index = [], 0
        while index < len(words):
            word = words[index]
            if word == "--":
                joined += words[index:]
                break
            if word in self.flags:
                following = words[index + 1] if index + 1 < len(words) else None
                if following is not None and following.lower() in TRUE_WORDS + FALSE_WORDS:
                    joined.append(f"{word}={following}")
                    index += 2
                    continue
                word = f"{word}=true"
            joined.append(word)
            index += 1
        return joined

    def parse_known_args(self, args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._joined_flags(words), namespace)

    def parse_with_overrides(self, argv=None, recipe_first: bool = False, allowed: bool = True):
        """(the script's own options, the other words): the other words must read as recipe overrides
        (parse_overrides), after a RECIPE.yaml first when recipe_first; with allowed False there must be none."""
        args, rest = self.parse_known_args(argv)
        if rest and not allowed:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        overrides = rest[1:] if recipe_first and rest and not rest[0].startswith("--") else rest
        try:
            parse_overrides(overrides)
        except UsageError as error:
            self.error(str(error))
        return args, rest

    def error(self, message: str) -> NoReturn:
        """One line and exit status 2, instead of argparse's usage block."""
        print(usage_line(message, self.prog), file=sys.stderr)
        raise SystemExit(2)


def recipe_words(description: str, argv=None) -> list[str]:
    """The words of a script that takes RECIPE.yaml and its `--key value` overrides alone (run_pretrain.py,
    run_sft.py), their grammar checked; --help prints `description`. The keys and values are RecipeParser's."""
    parser = ScriptParser(description=description, usage="%(prog)s RECIPE.yaml [--key value ...]")
    return parser.parse_with_overrides(argv, recipe_first=True)[1]
