"""A prepared folder's manifest: what its tokens are (tokenizer, the data keys that shaped them, the sources), how far
its preparation got, and the check that a recipe trains on what it says.

scripts/prepare_data.py writes OUTPUT/manifest.json (for a mixture, one per source, OUTPUT/<name>/manifest.json),
atomically (a temporary file renamed over it), before its tasks start and again when they end:

    format_version   MANIFEST_VERSION; a newer one is refused (made by a newer version of this project)
    tokenizer        name_or_path (as given), size (len(tokenizer)) and sha256 (`tokenizer_identity`)
    data             {key: value} of the CHECKED_KEYS, as `shaping_values` reads them from the DataArguments
    sources          the source this folder holds: name, weight, kind, dataset_name_or_path, data_dir, data_files,
                     eval_data_files (recorded, not checked: the same data may lie at another path on the
                     machine that trains; the store is what training reads)
    seed, epochs     the seed, and the data epochs prepared: a number for a store of per-epoch copies (file-level
                     FIM), null for tokens stored once (every epoch drawn at read time)
    tasks            --tasks of the preparation: datatrove marks completions by rank, so another count into the
                     same folder would take other tasks' work for done
    stages           per datatrove run: name, logging_dir (relative), tasks, completed (datatrove's completions/
                     there when the manifest was written), first_epoch and epochs for a tokens stage

The manifest records what the folder holds, never where its parts lie (data/store/prepared.py owns the layout).

`check_manifest` (training, before step 1) and `preparation_runs` (prepare_data.py, before any task) compare a
recipe with it key by key; a difference is refused in one RecipeError naming each key with both values. What
each checked key guards against:
- the tokenizer (its sha256, not its size): another tokenizer of the same vocabulary size (a retrained BPE, another
  model's) gives ids that mean other text; the model trains silently on noise;
- fim_level, as the tokens hold it (`stored_fim_level`): `file` when the prepared tokens carry file-level FIM
  (data/store/prepared.py's file_level_fim: fim_level file, fim_rate and fim_fragment_rate above 0), else `window`
  (no FIM in the tokens; any FIM is drawn per window while reading). A store prepared at `window` under a recipe
  at `file` trains with no FIM at all; one prepared at `file` under a recipe at `window` gets FIM twice;
- with file-level FIM (per-epoch copies) also fim_rate, fim_fragment_rate, fim_spm_rate and repo_metadata_rate,
  drawn into the tokens: the recipe's rates would not be the ones trained on. Tokens stored once draw these at
  read time (data/windows/), so there they are not checked;
- eval_fraction: which repositories are held out (a held-out repository would be trained on, or the other way);
- languages, license_types, exclude_vendor, exclude_generated, max_file_bytes: which files are in the tokens;
- max_repository_bytes: where a repository larger than the bound was cut into examples of its own;
- exclude_repositories: whose opt-outs were honoured;
- decontamination_benchmarks, decontamination_files, decontamination_min_chars: which benchmark files were removed
  (a store decontaminated against nothing makes the recipe's HumanEval score untrustworthy);
- pii_redaction, pii_model_path: whether personal data was redacted;
- near_dedup and its three MinHash keys: which near-duplicates were dropped;
- structure_tokens (document sources): which of their texts' special tokens were read as structure.
Not checked (READ_TIME_KEYS): what training reads or draws while it reads (seq_length, cross_document_attention,
the seed, and the FIM and metadata rates of tokens stored once), where data lies (the sources, prepared_data_dir),
and how this machine works (num_proc, shards, checksums, report paths).
"""

import hashlib
import json
import os
import socket

from starcoder2_train.configs import RecipeError
from starcoder2_train.data.store.prepared import LOGS, file_level_fim

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# The keys that shaped the tokens whatever the FIM level (the module docstring says what each guards against).
CHECKED_KEYS = (
    "fim_level",
    "eval_fraction",
    "languages",
    "license_types",
    "exclude_vendor",
    "exclude_generated",
    "max_file_bytes",
    "max_repository_bytes",
    "exclude_repositories",
    "decontamination_benchmarks",
    "decontamination_files",
    "decontamination_min_chars",
    "pii_redaction",
    "pii_model_path",
    "near_dedup",
    "near_dedup_ngrams",
    "near_dedup_buckets",
    "near_dedup_hashes_per_bucket",
    "structure_tokens",
)
# Also checked when the tokens carry file-level FIM (per-epoch copies): drawn into them at preparation.
FILE_FIM_KEYS = ("fim_rate", "fim_fragment_rate", "fim_spm_rate", "repo_metadata_rate")
SOURCE_KEYS = ("dataset_name_or_path", "data_dir", "data_files", "eval_data_files")
# Everything else a recipe's data keys say: read or drawn at training time, or where and how the data is read.
READ_TIME_KEYS = (
    *SOURCE_KEYS,
    *FILE_FIM_KEYS,  # with tokens stored once
    "seq_length",
    "cross_document_attention",
    "prepared_data_dir",
    "dataset_mixture",
    "tokenizer_name_or_path",  # checked by identity (tokenizer_identity), not by name
    "max_repositories",  # refused by prepare_data.py
    "num_proc",
    "num_shards",
    "shard_index",
    "verify_download_checksums",
    "decontamination_report",
    "dataset_kind",  # recorded with the source: `auto` resolves from the data, which training may not hold
)


def stored_fim_level(data_args) -> str:
    """fim_level as the prepared tokens hold it: `file` with file-level FIM in them, else `window`."""
    return "file" if file_level_fim(data_args) else "window"


def tokenizer_identity(tokenizer) -> dict:
    """name_or_path, size and a sha256 over what maps text to ids: the vocabulary (id and token, in id order), the
    added tokens (id, content, special) and, for a BPE, its merges (the same vocabulary merged in another order
    tokenizes text otherwise), joined with NUL (never in a byte-level BPE token). Read from transformers 5.25 /
    tokenizers 0.23 (get_vocab, added_tokens_decoder, the backend's JSON, whose merges are "a b" strings or [a, b]
    pairs by version: both hash alike). Cost, for a synthetic byte-level BPE of StarCoder2's 49,152 tokens on this
    2-core box shared with other jobs (load 5): 0.64-1.34 s, median 0.86 s of 7; once per training start and
    per preparation."""
    digest = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest.update("\x00".join(f"{index}\x01{token}" for token, index in vocab).encode("utf-8", "surrogatepass"))
    added = sorted(
        (index, token.content, bool(token.special)) for index, token in tokenizer.added_tokens_decoder.items()
    )
    digest.update(b"\x02" + json.dumps(added).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        merges = json.loads(backend.to_str()).get("model", {}).get("merges") or ()
        text = "\x00".join(merge if isinstance(merge, str) else " ".join(merge) for merge in merges)
        digest.update(b"\x02" + text.encode("utf-8", "surrogatepass"))
    return {"name_or_path": tokenizer.name_or_path, "size": len(tokenizer), "sha256": digest.hexdigest()}


def _plain(value):
    return json.loads(json.dumps(value))  # tuples as lists: the values read back from the JSON compare equal


def shaping_values(data_args) -> dict:
    """{key: value} of the keys that shaped the tokens (CHECKED_KEYS, FILE_FIM_KEYS with file-level FIM); a key
    this DataArguments does not have is left out."""
    keys = CHECKED_KEYS + (FILE_FIM_KEYS if file_level_fim(data_args) else ())
    values = {key: _plain(getattr(data_args, key)) for key in keys if hasattr(data_args, key)}
    values["fim_level"] = stored_fim_level(data_args)
    return values


def source_entry(data_args, source=None) -> dict:
    """What the folder's source was (recorded, not checked): its name, weight and kind for a mixture's source."""
    entry = {key: _plain(getattr(data_args, key, None)) for key in SOURCE_KEYS}
    if source is not None:
        entry = {"name": source.name, "weight": source.weight, "kind": source.kind, **entry}
    return entry


def build_manifest(data_args, tokenizer, *, seed: int, epochs: int, tasks: int, stages: list[dict], source=None):
    """The manifest of a preparation (the module docstring lists its fields); `stages` as `stage_record` makes."""
    return {
        "format_version": MANIFEST_VERSION,
        "tokenizer": tokenizer_identity(tokenizer),
        "data": shaping_values(data_args),
        "sources": [source_entry(data_args, source)],
        "seed": seed,
        "epochs": epochs if file_level_fim(data_args) else None,
        "tasks": tasks,
        "stages": stages,
    }


def stage_record(directory: str, name: str, logging_dir: str, tasks: int, epochs: tuple[int, int] | None = None):
    """One datatrove run: its tasks and how many datatrove's completions/ marks done (data/prepare.py's
    completed_tasks); `epochs` (first, end) for a tokens stage."""
    from starcoder2_train.data.prepare import completed_tasks  # datatrove and fsspec: prepare_data.py's imports

    record = {"name": name, "logging_dir": os.path.relpath(logging_dir, directory), "tasks": tasks}
    record["completed"] = min(tasks, completed_tasks(logging_dir))
    if epochs is not None:
        record["first_epoch"], record["epochs"] = epochs
    return record


def write_manifest(directory: str, manifest: dict) -> str:
    """manifest.json in `directory`, written whole or not at all (a temporary file renamed over the old one)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MANIFEST)
    partial = f"{path}.{socket.gethostname()}-{os.getpid()}.partial"  # machines of --num_shards may write at once
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(partial, path)
    return path


def read_manifest(directory: str) -> dict | None:
    """The folder's manifest, or None when it has none; one that is not this project's JSON is refused."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RecipeError(f"{path}: not a readable manifest ({error}); prepare the folder again.") from None
    if version > MANIFEST_VERSION:
        raise RecipeError(
            f"{path}: format_version {version}, and this version of starcoder2-train reads {MANIFEST_VERSION} at "
            "most; update starcoder2-train, or prepare the folder again with this one."
        )
    return manifest


def _show(value) -> str:
    return "unset" if value is None else json.dumps(value, ensure_ascii=False)


def differences(manifest: dict, data_args, tokenizer) -> list[tuple[str, str, str]]:
    """(key, the folder's value, the recipe's value) for each checked key on which they differ, tokenizer first."""
    found = []
    stored, ours = manifest["tokenizer"], tokenizer_identity(tokenizer)
    if stored["sha256"] != ours["sha256"]:
        describe = lambda t: f"{t['name_or_path']} ({t['size']:,} tokens, sha256 {t['sha256'][:12]})"  # noqa: E731
        found.append(("tokenizer_name_or_path", describe(stored), describe(ours)))
    data, recipe = manifest["data"], shaping_values(data_args)
    if data.get("fim_level") != recipe["fim_level"]:  # before the rates: a level's rates are not the other's keys
        hint = lambda level: " (file-level FIM in the tokens)" if level == "file" else " (no FIM in the tokens)"  # noqa: E731
        found.append(("fim_level", data.get("fim_level", "?") + hint(data.get("fim_level")),
                      recipe["fim_level"] + hint(recipe["fim_level"])))  # fmt: skip
        return found
    for key in recipe.keys() | data.keys():
        if key != "fim_level" and data.get(key) != recipe.get(key):
            found.append((key, _show(data.get(key)), _show(recipe.get(key))))
    return sorted(found, key=lambda item: (item[0] != "tokenizer_name_or_path", item[0]))


def describe_differences(found: list[tuple[str, str, str]], folder_word: str, recipe_word: str) -> str:
    return "; ".join(f"{key}: {folder_word} {stored}, {recipe_word} {ours}" for key, stored, ours in found)


def no_manifest_error(directory: str, command: str) -> RecipeError:
    """A folder without a manifest: prepared before preparations wrote one (or not a prepared folder)."""
    return RecipeError(
        f"{directory}: no {MANIFEST}; it was prepared before preparations recorded what they hold (tokenizer, data "
        f"keys), or is not a prepare_data.py folder, so {command} cannot check that its tokens are the recipe's. "
        "Prepare it again into a new folder: scripts/prepare_data.py RECIPE.yaml --output NEW_DIR."
    )


def check_manifest(directory: str, data_args, tokenizer) -> dict:
    """Refuse a prepared folder whose tokens are not what the recipe describes (the module docstring: which keys
    and why), or that has no manifest; returns the manifest."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise no_manifest_error(directory, "training")
    found = differences(manifest, data_args, tokenizer)
    if found:
        raise RecipeError(
            f"prepared_data_dir: {directory} was prepared with other settings than the recipe's: "
            f"{describe_differences(found, 'the folder has', 'the recipe')}. Set the recipe's keys to the folder's "
            "values, or prepare again with the recipe into a new folder (scripts/prepare_data.py RECIPE.yaml "
            "--output NEW_DIR)."
        )
    return manifest


def check_prepared_sources(data_args, tokenizer) -> None:
    """check_manifest on every prepared store a recipe trains on: each mixture source's own (its DataArguments'
    prepared_data_dir, configs/data_sources.py), or the one prepared_data_dir. Nothing without prepared data. A
    one-source recipe is checked as it is (its sources() would resolve the kind from data training need not hold);
    prepare_data.py records it the same way."""
    if getattr(data_args, "dataset_mixture", None) is not None:
        for source in data_args.sources():
            if source.data_args.prepared_data_dir is not None:
                check_manifest(source.data_args.prepared_data_dir, source.data_args, tokenizer)
    elif data_args.prepared_data_dir is not None:
        check_manifest(data_args.prepared_data_dir, data_args, tokenizer)


def preparation_runs(directory: str, data_args, tokenizer, *, epochs: int, tasks: int, seed: int) -> list:
    """The tokens runs, (first epoch, end epoch) each, of a preparation into `directory`, refused before any task
    when the folder holds another preparation:
    - a new folder: [(0, epochs)];
    - a folder with a manifest and the same settings: its own runs again, which datatrove resumes (only the tasks
      without a completion run), plus (prepared, epochs) when a store of per-epoch copies gets more epochs: a run
      of its own, whose logging dir has no completions yet. Fewer epochs than prepared changes nothing;
    - other settings (a checked key, the tokenizer, --tasks, or the seed of per-epoch draws): refused, each named
      with both values;
    - a folder prepared before manifests (datatrove's logs/ and no manifest): refused, what it holds unknown."""
    manifest = read_manifest(directory)
    if manifest is None:
        if os.path.isdir(os.path.join(directory, LOGS)):
            raise no_manifest_error(directory, "prepare_data.py")
        return [(0, epochs)]
    found = differences(manifest, data_args, tokenizer)
    if manifest["tasks"] != tasks:
        found.append(("--tasks", str(manifest["tasks"]), str(tasks)))
    if file_level_fim(data_args) and manifest["seed"] != seed:
        found.append(("seed", _show(manifest["seed"]), _show(seed)))
    if found:
        raise RecipeError(
            f"--output: {directory} holds a preparation with other settings: "
            f"{describe_differences(found, 'the folder has', 'this command')}. Rerun with the folder's settings to "
            "resume or extend it, or prepare into a new --output."
        )
    runs = [(stage["first_epoch"], stage["epochs"]) for stage in manifest["stages"] if "first_epoch" in stage]
    prepared = max((end for _, end in runs), default=0)
    if file_level_fim(data_args) and epochs > prepared:
        runs.append((prepared, epochs))
    return runs
