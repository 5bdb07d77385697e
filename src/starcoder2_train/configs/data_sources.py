"""A recipe's data sources: `dataset_mixture` entries read into `DataSource`s, each with its own DataArguments.

A mixture entry is a mapping: `dataset_name_or_path` (required), `weight` (required, > 0: its share of the training
windows once the weights are divided by their sum), `name` (optional: a folder-safe name, unique in the mixture;
default the last component of dataset_name_or_path, with data_dir's appended), and any data key that makes sense
per source (`PER_SOURCE_KEYS`: what a source is and where it lies, its filters, its FIM and metadata rates, its
structure tokens, its prepared store). The other data keys shape the windows every source is packed into (the
tokenizer, seq_length, fim_level, ...) or the machine (num_proc, shards) and are the recipe's alone: an entry
that names one is refused, as is an unknown key. Each source's DataArguments is the recipe's with the entry's
keys put in, checked by DataArguments' own __post_init__ (an error then names the entry).

`dataset_name_or_path` alone (no dataset_mixture) is a mixture of one source of weight 1, read through the same
code. Where each source's prepared store lies (the convention scripts/prepare_data.py writes): the entry's own
`prepared_data_dir`, else the recipe's `prepared_data_dir`/NAME for a recipe with dataset_mixture, else the
recipe's `prepared_data_dir` itself (`DataSource.subdirectory` gives NAME or "").

The standard library only at import time; the schema test of `dataset_kind: auto` (data/sources/documents.py)
is imported when a source is resolved.
"""

import difflib
import math
import os
import re
from dataclasses import dataclass, fields, replace

from starcoder2_train.configs.shared import RecipeError

REPOSITORIES, DOCUMENTS = "repositories", "documents"
DATASET_KINDS = ("auto", REPOSITORIES, DOCUMENTS)
# Keys that shape every window alike or configure this machine: the recipe's only, never a source's.
RECIPE_ONLY_KEYS = (
    "dataset_mixture",
    "tokenizer_name_or_path",
    "seq_length",
    "fim_level",
    "cross_document_attention",
    "num_proc",
    "num_shards",
    "shard_index",
    "decontamination_report",
)
ENTRY_KEYS = ("name", "weight")  # an entry's own keys; every other key of an entry is a DataArguments key
SOURCE_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")


def per_source_keys(data_class) -> tuple[str, ...]:
    """The DataArguments keys a mixture entry may set: every data key but RECIPE_ONLY_KEYS (a key added to
    DataArguments is per source unless it is listed there)."""
    return tuple(f.name for f in fields(data_class) if f.init and f.name not in RECIPE_ONLY_KEYS)


@dataclass
class DataSource:
    """One source of the mixture: `weight` normalised (the weights sum to 1), `kind` resolved (repositories or
    documents), `data_args` the recipe's DataArguments with the entry's keys put in (dataset_mixture None,
    prepared_data_dir where this source's store lies), `entry` the entry as written (for the model card)."""

    name: str
    weight: float
    kind: str
    data_args: object
    entry: dict
    subdirectory: str = ""  # where prepare_data.py writes this source under its --output ("" : the output itself)


def _default_name(entry: dict) -> str:
    path = str(entry.get("dataset_name_or_path") or "").rstrip("/\\")
    name = os.path.basename(path) or "source"
    if entry.get("data_dir"):
        name += "-" + str(entry["data_dir"]).strip("/").replace("/", "-")
    name = re.sub(r"[^\w.-]", "-", name)
    return name if SOURCE_NAME.fullmatch(name) else f"source-{name}"


def _check_entry(index: int, entry, allowed: tuple[str, ...]) -> tuple[str, float, dict]:
    """(name, weight as written, the entry's DataArguments keys) of entry `index`, or a RecipeError naming it."""
    where = f"dataset_mixture[{index}]"
    if not isinstance(entry, dict):
        raise RecipeError(
            f"{where}: must be a mapping such as {{dataset_name_or_path: data/mine, weight: 0.2}}, got {entry!r}."
        )
    name = entry.get("name")
    where = f"{where} ({name or entry.get('dataset_name_or_path')})"
    for key in entry:
        if key in RECIPE_ONLY_KEYS:
            raise RecipeError(
                f"{where}: {key} is not per source (it shapes every source's windows alike); set it once at the "
                "recipe's top level."
            )
        if key not in ENTRY_KEYS and key not in allowed:
            close = difflib.get_close_matches(str(key), ENTRY_KEYS + allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(
                f"{where}: unknown key {key!r}.{hint} An entry takes name, weight and the per-source data keys "
                f"({', '.join(allowed)})."
            )
    if not entry.get("dataset_name_or_path"):
        raise RecipeError(f"{where}: dataset_name_or_path: not set; every source names its data.")
    weight = entry.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise RecipeError(
            f"{where}: weight: must be a positive number (its share of the training windows), got {weight!r}."
        )
    name = str(name) if name is not None else _default_name(entry)
    if not SOURCE_NAME.fullmatch(name):
        raise RecipeError(
            f"{where}: name: {name!r} must be letters, digits, '.', '_' or '-' (it names the source's prepared "
            "folder), starting with a letter or digit."
        )
    return name, float(weight), {key: value for key, value in entry.items() if key not in ENTRY_KEYS}


def resolve_sources(data_args) -> list[DataSource]:
    """The DataSources of a recipe's DataArguments (see the module docstring); every entry checked."""
    mixture = data_args.dataset_mixture
    if mixture is None:  # dataset_name_or_path alone (or only prepared_data_dir): one source of weight 1
        entries = [{"dataset_name_or_path": data_args.dataset_name_or_path}]
        checked = [(_default_name(entries[0]), 1.0, {})]
    else:
        entries = mixture
        allowed = per_source_keys(type(data_args))
        checked = [_check_entry(index, entry, allowed) for index, entry in enumerate(entries)]
    names = [name for name, _, _ in checked]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise RecipeError(
                f"dataset_mixture[{index}]: name {name!r} is also entry {names.index(name)}'s; give each entry its "
                "own name (it names the source's prepared folder and its line in the report)."
            )
    total = sum(weight for _, weight, _ in checked)
    sources = []
    for index, (name, weight, keys) in enumerate(checked):
        subdirectory = name if mixture is not None else ""
        if "prepared_data_dir" not in keys and data_args.prepared_data_dir is not None:
            keys["prepared_data_dir"] = os.path.join(data_args.prepared_data_dir, subdirectory).rstrip("/\\") or "."
        try:
            source_args = replace(data_args, dataset_mixture=None, **keys)
        except RecipeError as error:
            raise RecipeError(f"dataset_mixture[{index}] ({name}): {error}") from None
        from starcoder2_train.data.sources.documents import source_kind  # the schema test reads parquet/JSONL

        source_args.dataset_kind = source_kind(source_args)
        entry = dict(entries[index])
        sources.append(DataSource(name, weight / total, source_args.dataset_kind, source_args, entry, subdirectory))
    return sources
