"""Checkpoints that are never half-written, the newest complete one to resume from, and the run's recipe.

transformers 5.24's `Trainer._save_checkpoint` writes `checkpoint-N` in place (no temporary directory),
`rotate_checkpoints` counts every `checkpoint-*` folder and keeps the newest *by name or mtime*, and
`get_last_checkpoint` returns the highest N whatever its state. A save killed half-way, or stopped by a full
disk, therefore leaves a `checkpoint-N` that a restart picks and fails on, and with `save_total_limit: 1` the
last good checkpoint is already gone. Here instead (`save_atomically`, called by PretrainingTrainer):

1. every rank writes the Trainer's normal checkpoint into `OUTPUT_DIR/.incomplete/checkpoint-N` (same
   filesystem, so the final rename is atomic); a copy of `run_recipe.json` goes with it, and the trainer's
   `checkpoint_records()` (`data_position.json`: training/data_position.py);
2. the ranks agree that all of them wrote without error (gloo all-reduce, which is also the barrier);
3. rank 0 verifies it (`verify_checkpoint`: the files the Trainer writes are there and non-empty, every
   safetensors header parses and matches its file size, every torch.save file's zip directory is readable,
   trainer_state.json parses, one RNG state per rank and one ZeRO optimizer shard per rank), fsyncs the files,
   writes the marker `checkpoint_complete.json` (each file's size) last with fsync, renames the folder to
   `OUTPUT_DIR/checkpoint-N` and fsyncs OUTPUT_DIR;
4. only then are older complete checkpoints rotated (`rotate`): the one just saved and the newest complete one
   are never deleted, incomplete folders never count as kept, and a deleted checkpoint is first renamed away, so
   that nothing half-deleted ever looks complete.

Cost at scale (StarCoder2-3B on 160 GPUs, ~36 GB of optimizer state a save): verification reads headers and
zip directories only (a few KB per file, ~330 files), not the 36 GB; the fsync forces rank 0's files to disk
(seconds on a parallel filesystem, whose other clients' writes are flushed by their close()); two extra
all-reduces per save. A rank that fails *inside* DeepSpeed's own save_checkpoint (which has its own barriers)
can still leave the other ranks waiting until the process group's timeout.

A restart (`resolve_resume`) takes the newest `checkpoint-N` whose marker is there and whose files still have the
marked sizes, logs each one it skipped and why, and refuses an output_dir or a checkpoint of another recipe
(`run_recipe.json`: the values that define the run's model and data, compared key by key).
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile

from starcoder2_train.configs import RecipeError, windows_per_step
from starcoder2_train.training.preemption import all_ranks_max

logger = logging.getLogger(__name__)

STAGING_DIR = ".incomplete"  # OUTPUT_DIR/.incomplete/checkpoint-N while a save is in progress
COMPLETE_MARKER = "checkpoint_complete.json"  # written last, with fsync: {"step", "files": {name: size}}
RUN_RECIPE = "run_recipe.json"  # in OUTPUT_DIR and in every checkpoint
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
UNMARKED = frozenset({"README.md"})  # rewritten after the marker (the model card); not needed to resume
# Recipe keys of the model and data that do not change what is trained: how fast, not what.
NOT_DEFINING = frozenset({"num_proc", "attn_implementation", "flash_attention_impl", "trust_remote_code"})
# Training keys that define the optimization, compared at a resume when both recipes record them (written since
# `211e9c3`). Not among them, by design: per_device_train_batch_size, gradient_accumulation_steps and the number of
# processes, which a resume on another number of GPUs must change; their product, the global batch
# (`windows_per_step`), is compared (training/data_position.py says why a changed one is refused). Not either:
# max_steps (a run may be lengthened), output, logging, saving, evaluation and loader keys.
TRAINING_DEFINING = (
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args",
)  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved completely; the previous complete checkpoint is untouched."""


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _files(folder: str) -> dict[str, int]:
    """Every file under `folder` (relative name → size in bytes)."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def safetensors_problem(path: str) -> str | None:
    """None when the header of the safetensors file `path` parses and its tensors end exactly at the file's end."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path}: {size} bytes, too short for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"{path}: header of {length} bytes in a file of {size} bytes (truncated)"
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            return f"{path}: unreadable safetensors header ({error})"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{path}: tensors end at byte {8 + length + end} but the file has {size} bytes (truncated)"
    return None


def _torch_file_problem(path: str) -> str | None:
    """None when the zip directory at the end of the torch.save file `path` is readable (a cut file has none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"{path}: not a complete torch.save file ({error})"
    return None


def verify_checkpoint(folder: str, world_size: int = 1, expect_optimizer: bool = True) -> list[str]:
    """What is missing or broken in the checkpoint `folder`, as one line each (empty: complete)."""
    files = _files(folder) if os.path.isdir(folder) else {}
    problems = [f"{os.path.join(folder, name)}: empty file" for name, size in files.items() if size == 0]
    try:
        with open(os.path.join(folder, "trainer_state.json")) as handle:
            json.load(handle)["global_step"]
    except (OSError, ValueError, KeyError) as error:
        problems.append(f"{folder}/trainer_state.json: missing or unreadable ({error})")
    deepspeed = "latest" in files
    weights = [name for name in files if name.endswith(".safetensors")]
    if not weights and not deepspeed and "pytorch_model.bin" not in files:
        problems.append(f"{folder}: no model weights (model.safetensors or its shards)")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            shards = set(json.load(handle)["weight_map"].values())
        problems += [f"{folder}/{shard}: missing (named by the index)" for shard in sorted(shards - set(files))]
    problems += [problem for name in weights if (problem := safetensors_problem(os.path.join(folder, name)))]
    torch_files = [name for name in files if name.endswith((".pt", ".pth", ".bin"))]
    problems += [problem for name in torch_files if (problem := _torch_file_problem(os.path.join(folder, name)))]
    if expect_optimizer:
        rng = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
        problems += [f"{folder}/{name}: missing" for name in rng if name not in files]
        if deepspeed:
            with open(os.path.join(folder, "latest")) as handle:
                tag = handle.read().strip()
            shards = [name for name in files if name.startswith(f"{tag}/") and name.endswith("optim_states.pt")]
            if len(shards) < world_size:
                problems.append(f"{folder}/{tag}: {len(shards)} optimizer shards for {world_size} ranks")
        elif "optimizer.pt" not in files:
            problems.append(f"{folder}/optimizer.pt: missing")
    return problems


def completeness_problem(folder: str) -> str | None:
    """None when `folder` has the marker and every file it lists still has its size (stat only, cheap)."""
    try:
        with open(os.path.join(folder, COMPLETE_MARKER)) as handle:
            marked = json.load(handle)["files"]
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER}: its save did not finish (or it was written without this project's Trainer)"
    except (OSError, ValueError, KeyError) as error:
        return f"unreadable {COMPLETE_MARKER} ({error})"
    for name, size in marked.items():
        path = os.path.join(folder, name)
        if name in UNMARKED:  # marked by an earlier version of this project; rewritten since, by design
            continue
        if not os.path.exists(path) or os.path.getsize(path) != size:
            return f"{name}: {os.path.getsize(path) if os.path.exists(path) else 'no'} bytes, marked {size}"
    return None


def _mark_complete(folder: str, step: int) -> None:
    # The model card is rewritten after every save (hub/callback.py), and is not needed to resume: not marked.
    files = {name: size for name, size in _files(folder).items() if name not in UNMARKED}
    for name in files:
        _fsync(os.path.join(folder, name))
    with open(os.path.join(folder, COMPLETE_MARKER), "w") as handle:
        json.dump({"step": step, "files": files, "time": time.time()}, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` folder in output_dir, newest first."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found, reverse=True)


def newest_complete_checkpoint(output_dir: str, recipe: dict | None = None) -> tuple[str | None, list]:
    """The newest complete checkpoint of output_dir (of `recipe`, when given), and [(path, reason)] skipped."""
    skipped = []
    staging = os.path.join(output_dir, STAGING_DIR)
    for name in sorted(os.listdir(staging)) if os.path.isdir(staging) else []:
        skipped.append((os.path.join(staging, name), "a save that did not finish (killed or failed mid-save)"))
    for _, path in _checkpoints(output_dir):
        problem = completeness_problem(path)
        if problem is None and recipe is not None:
            differing = recipe_differences(_read_recipe(path), recipe)
            problem = f"from another recipe (differs in {', '.join(differing)})" if differing else None
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def rotate(output_dir: str, limit: int | None, keep: str, recipe: dict | None = None) -> list[str]:
    """Delete the oldest complete checkpoints (of `recipe`) beyond `limit`, never `keep` nor the newest complete
    one, and the folders of saves that never finished; returns what was deleted."""
    deleted = []
    staging = os.path.join(output_dir, STAGING_DIR)
    for name in os.listdir(staging) if os.path.isdir(staging) else []:
        shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
        deleted.append(os.path.join(staging, name))
    if not limit or limit <= 0:
        return deleted
    complete = [path for _, path in _checkpoints(output_dir) if completeness_problem(path) is None]
    if recipe is not None:
        complete = [path for path in complete if not recipe_differences(_read_recipe(path), recipe)]
    protected = {os.path.abspath(keep)} | {os.path.abspath(path) for path in complete[:1]}
    kept = len(complete)
    for path in reversed(complete):  # oldest first
        if kept <= max(limit, len(protected)):
            break
        if os.path.abspath(path) in protected:
            continue
        doomed = os.path.join(output_dir, STAGING_DIR, f"deleting-{os.path.basename(path)}")
        os.makedirs(os.path.dirname(doomed), exist_ok=True)
        os.rename(path, doomed)  # gone from the checkpoints at once; the bytes go next
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
        kept -= 1
    logger.info("save_total_limit %s: deleted %s", limit, deleted or "nothing")
    return deleted


def save_atomically(trainer, write, run_dir: str) -> str:
    """Save the checkpoint of `trainer`'s current step through `write(staging_parent)` (the Trainer's own
    `_save_checkpoint`, made to write under `run_dir/.incomplete`), verify it, mark it complete, rename it to
    `run_dir/checkpoint-N` and rotate. Every rank calls it. Raises CheckpointError on every rank when any rank
    failed to write or the checkpoint did not verify; the previous complete checkpoint is then left as it was."""
    step, args = trainer.state.global_step, trainer.args
    main = trainer.is_world_process_zero()
    staging_parent = os.path.join(run_dir, STAGING_DIR)
    staging, final = os.path.join(staging_parent, f"checkpoint-{step}"), os.path.join(run_dir, f"checkpoint-{step}")
    recipe = getattr(trainer, "run_recipe", None)
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging_parent, exist_ok=True)
    all_ranks_max(0)  # the folder is clean before anyone writes
    error = None
    try:
        write(staging_parent)
        if main and recipe is not None:
            _write_json(os.path.join(staging, RUN_RECIPE), recipe)
        records = getattr(trainer, "checkpoint_records", None)  # data_position.json (PretrainingTrainer)
        for name, record in (records() if main and records else {}).items():
            _write_json(os.path.join(staging, name), record)
    except Exception as caught:  # noqa: BLE001 - reported below, on every rank, with the folder named
        error = caught
    failed = all_ranks_max(int(error is not None))
    if not failed and main:
        try:
            problems = verify_checkpoint(staging, args.world_size, expect_optimizer=not args.save_only_model)
            if problems:
                raise CheckpointError("; ".join(problems))
            _mark_complete(staging, step)
            if os.path.exists(final):  # a checkpoint of this step from an earlier attempt: replaced
                os.rename(final, os.path.join(staging_parent, f"deleting-checkpoint-{step}"))
            os.rename(staging, final)
            _fsync(run_dir)
        except Exception as caught:  # noqa: BLE001
            error = caught
    failed = all_ranks_max(int(error is not None)) or failed
    if failed:
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # frees the space a full disk needs back
        previous, _ = newest_complete_checkpoint(run_dir)
        reason = f"{type(error).__name__}: {error}" if error is not None else "another rank failed (see its log)"
        raise CheckpointError(
            f"saving checkpoint {final} (written in {staging}) failed: {reason}. Nothing was marked complete; "
            f"a restart resumes from {previous or 'the start (no complete checkpoint)'}. Free space in {run_dir} "
            "or lower save_total_limit, then start the same command again."
        ) from error
    if main:
        rotate(run_dir, args.save_total_limit, keep=final, recipe=recipe)
        logger.info("checkpoint %s complete (%s)", final, COMPLETE_MARKER)
    all_ranks_max(0)  # no rank goes on (to a resume, an exit) before the rename
    return final


# -- The run's recipe ------------------------------------------------------------------------------------------


def _field_defaults(arguments) -> dict:
    defaults = {}
    for item in dataclasses.fields(arguments):
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
    return defaults


def run_recipe(model_args, data_args, training_args, recipe_values: dict) -> dict:
    """What defines a run, for run_recipe.json: every model and data value (but the speed-only NOT_DEFINING) and
    the seed, with the recipe as given (recipe_values) for people to read, and each key's default (so that a key
    added by a newer version of this project, at its default, does not make an older checkpoint another run's);
    and under "training" the optimization's keys (TRAINING_DEFINING) with the global batch `windows_per_step`,
    compared only where both records have them (run_recipe.json files written before they existed have not)."""
    defining, defaults = {}, {}
    for arguments in (model_args, data_args):
        defining.update({k: v for k, v in vars(arguments).items() if k not in NOT_DEFINING})
        defaults.update({k: v for k, v in _field_defaults(arguments).items() if k not in NOT_DEFINING})
    defining["seed"] = training_args.seed
    record = {"defining": defining, "defaults": defaults, "recipe_values": recipe_values}
    if hasattr(training_args, "per_device_train_batch_size"):  # TrainingArguments (not a bare seed holder)
        record["training"] = {key: getattr(training_args, key, None) for key in TRAINING_DEFINING}
        record["training"]["windows_per_step"] = windows_per_step(training_args)
    return json.loads(json.dumps(record, default=str))


def recipe_differences(saved: dict | None, current: dict) -> list[str]:
    """The defining keys whose values differ between two run recipes (none when `saved` is None: nothing to
    compare with). A key one of them lacks (written by another version of this project) counts at its default."""
    if saved is None:
        return []
    old, new = saved.get("defining", {}), current["defining"]
    defaults = {**saved.get("defaults", {}), **current.get("defaults", {})}
    absent = object()

    def value(side: dict, key: str):
        return side[key] if key in side else defaults.get(key, absent)

    differing = sorted(key for key in set(old) | set(new) if value(old, key) != value(new, key))
    trained, training = saved.get("training", {}), current.get("training", {})  # compared where both record them
    return differing + sorted(key for key in set(trained) & set(training) if trained[key] != training[key])


def _read_recipe(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, RUN_RECIPE)) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def _write_json(path: str, value: dict) -> None:
    with open(f"{path}.tmp", "w") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(f"{path}.tmp", path)


def _recorded(record: dict, key: str):
    return record["defining"][key] if key in record.get("defining", {}) else record.get("training", {}).get(key)


def _mismatch(what: str, saved: dict, recipe: dict, differing: list[str]) -> RecipeError:
    details = ", ".join(f"{k}: {_recorded(saved, k)!r} there, {_recorded(recipe, k)!r} now" for k in differing)
    batch = (
        " windows_per_step is the global batch, per_device_train_batch_size × gradient_accumulation_steps × "
        "processes: on another number of processes, change the first two so that it stays the same."
        if "windows_per_step" in differing
        else ""
    )
    return RecipeError(
        f"{what} was made by another recipe ({details}). Use a new output_dir for this recipe, or "
        f"--resume_from_checkpoint a checkpoint of this recipe, or restore that run's values.{batch}"
    )


def resolve_resume(training_args, recipe: dict) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint` when given (it must be complete and of this
    recipe), else the newest complete checkpoint of output_dir of this recipe (skipped ones are logged), or None.
    Refuses an output_dir that holds another recipe's run; records the recipe in output_dir (rank 0)."""
    output_dir, explicit = training_args.output_dir, training_args.resume_from_checkpoint
    if explicit:
        problem = completeness_problem(explicit)
        if problem is not None:
            problems = verify_checkpoint(explicit, training_args.world_size, not training_args.save_only_model)
            if problems:
                raise RecipeError(f"resume_from_checkpoint: {explicit} is not a complete checkpoint: {problems}")
            logger.warning("resume_from_checkpoint %s: %s; its files verify, resuming from it", explicit, problem)
        saved = _read_recipe(explicit) or _read_recipe(os.path.dirname(os.path.abspath(explicit)))
        differing = recipe_differences(saved, recipe)
        if differing:
            raise _mismatch(f"resume_from_checkpoint {explicit}", saved, recipe, differing)
        resume = explicit
    else:
        saved = _read_recipe(output_dir)
        differing = recipe_differences(saved, recipe)
        if differing:
            raise _mismatch(f"output_dir {output_dir} holds a run that", saved, recipe, differing)
        resume, skipped = newest_complete_checkpoint(output_dir, recipe)
        for path, reason in skipped:
            logger.warning("resume: skipped %s: %s", path, reason)
        if resume is not None:
            logger.info("resuming from %s, the newest complete checkpoint", resume)
    if training_args.process_index == 0:
        os.makedirs(output_dir, exist_ok=True)
        _write_json(os.path.join(output_dir, RUN_RECIPE), recipe)
    return resume
