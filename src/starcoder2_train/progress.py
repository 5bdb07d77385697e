"""Progress bars for the long work outside the Trainer (ingest, tokenizer training, download, preparation, FIM
evaluation, HumanEval execution): tqdm with its rate and ETA.

Quiet as the Trainer is: off with `disable=True` (the scripts' `--disable_tqdm`, a recipe's `disable_tqdm`), and
off when stderr is not a terminal (a log file, a batch job), unless STARCODER2_PROGRESS=1 forces it on. One place
decides, so that every command behaves the same.
"""

import os
import sys

from tqdm.auto import tqdm

FORCE_ENV = "STARCODER2_PROGRESS"  # "1": bars even when stderr is not a terminal; "0": never


def progress_disabled(disable: bool | None = None) -> bool:
    """Whether bars are off: `disable` when given (True/False), else STARCODER2_PROGRESS, else off off a TTY."""
    if disable is not None:
        return bool(disable)
    forced = os.environ.get(FORCE_ENV)
    if forced in ("0", "1"):
        return forced == "0"
    return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", disable: bool | None = None):
    """tqdm over `iterable` (or a manual bar, `.update(n)`, when it is None), quiet per `progress_disabled`."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=progress_disabled(disable), dynamic_ncols=True)
