"""Where a run is in its window sequence, recorded in every checkpoint; a resume starts there in O(1).

The training dataset (data/pipeline.py build_training_data: DataEpochs, MixtureDataset or a PackedDataset) is
map-style: window i of the run is a function of (recipe, seed, i) alone, whatever the ranks and workers.
`WindowSampler` hands out i = start, start + 1, ... over the ranges of `skipped_windows` (below), one global
sequence; accelerate's BatchSamplerShard gives rank r micro-batches r, r + W, r + 2W, ... of it, so optimizer
step s trains exactly the next G = per_device_train_batch_size × gradient_accumulation_steps × processes windows
of the sequence, whatever W, the per-device batch, the accumulation or the loader workers (workers only fetch
the indices the main process's sampler gives them).

The position: each complete checkpoint-N holds `data_position.json` (DATA_POSITION):
    {"next_window": R, "global_step": N, "windows_per_step": G, "world_size": W,
     "per_device_train_batch_size": b, "gradient_accumulation_steps": A,
     "skipped_windows": [[start, stop], ...], "sources": {name: windows, ...}}
R is the raw index of the first window step N + 1 trains (skipped ranges already passed over): from the resumed
start R0 at step N0, R = advance(R0, (N - N0) × G, skipped), O(number of ranges). `sources` (mixtures only) is
derived from the mixture schedule (windows/mixture.py `windows_read(R)`: the windows of each source among the
first R of the sequence, skipped ones included, since they are passed over): for people and reports, not read
back. A resume reads R and the sampler starts there: no walk over the windows or batches before it, where
transformers' Trainer walked accelerate's SkipBatchSampler over every trained micro-batch (`global_step ×
gradient_accumulation_steps` per rank, each drawn through BatchSamplerShard's pass over every rank's batches:
384M batches per rank at the end of the 3B run, ~2.5 minutes measured by scripts/benchmark_data_position.py)
and, after a change of world size, recomputed the position from the new per-rank batch. A checkpoint without
the file (written before this module) resumes at `global_step × G` of this run, as the Trainer did, and says so.

A changed global batch G is refused by name at the resume (training/checkpoints.py, `windows_per_step` in the
run recipe's training keys): the learning-rate schedule, warmup, max_steps and the spike rollback's step to
window arithmetic are all counted in optimizer steps of G windows; another G is another optimization (and
max_steps would no longer reach the planned tokens). The data position itself would allow it.

`skipped_windows` (the contract with the spike rollback, training/spikes.py): OUTPUT_DIR/skipped_windows.json,
    {"ranges": [[start, stop], ...], "reasons": [{"range": [start, stop], "steps": [first, last], "why": "..."}]}
half-open global window indices; only `ranges` is read; unsorted or overlapping ranges are merged. Written
atomically by rank 0 (`write_skipped_windows`, which merges with what is there) before the rolled-back run
builds its trainer; ranges are only added. The sampler jumps over them with a bisect on the sorted ranges; the
ranges in force are copied into each checkpoint's data_position.json and joined with the file's at a resume.
`windows_of_steps(position, first, last)` gives the raw ranges that steps first..last (after the position's
step) train: what to append after rolling back to that checkpoint. The dataset must hold max_steps × G plus
the skipped windows for the run to reach max_steps (`windows_needed`): run.py builds the data with
`data_arguments_for_skips` (max_steps raised to cover them, for the data only).
"""

import bisect
import copy
import json
import logging
import os

import torch

from starcoder2_train.configs import RecipeError, windows_per_step

logger = logging.getLogger(__name__)

DATA_POSITION = "data_position.json"  # in every checkpoint
SKIPPED_WINDOWS = "skipped_windows.json"  # in OUTPUT_DIR, written by the spike rollback


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Half-open [start, stop) ranges sorted, empty ones dropped, overlapping or adjacent ones joined."""
    merged: list[list[int]] = []
    for start, stop in sorted((int(a), int(b)) for a, b in ranges):
        if stop <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(start, stop) for start, stop in merged]


def read_skipped_windows(output_dir: str) -> list[tuple[int, int]]:
    """The ranges of OUTPUT_DIR/skipped_windows.json, merged ([] without the file)."""
    path = os.path.join(output_dir, SKIPPED_WINDOWS)
    try:
        with open(path) as handle:
            ranges = json.load(handle)["ranges"]
        return merge_ranges(ranges)
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as error:
        raise RecipeError(f'{path}: expected {{"ranges": [[start, stop], ...]}} of window indices ({error})') from None


def write_skipped_windows(output_dir: str, ranges, reason: dict | None = None) -> list[tuple[int, int]]:
    """Add `ranges` (and `reason`, free-form) to OUTPUT_DIR/skipped_windows.json, atomically; returns all ranges."""
    path = os.path.join(output_dir, SKIPPED_WINDOWS)
    record = {"ranges": [], "reasons": []}
    if os.path.exists(path):
        with open(path) as handle:
            record.update(json.load(handle))
    record["ranges"] = [list(pair) for pair in merge_ranges([*record["ranges"], *ranges])]
    if reason is not None:
        record["reasons"] = [*record.get("reasons", []), reason]
    with open(f"{path}.tmp", "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(f"{path}.tmp", path)
    return [tuple(pair) for pair in record["ranges"]]


def _skipped_at_or_after(index: int, ranges) -> int:
    """Position in `ranges` (sorted, merged) of the first range that ends after `index`."""
    return bisect.bisect_right([stop for _, stop in ranges], index)


def next_unskipped(index: int, ranges) -> int:
    """`index`, or the end of the skipped range that holds it."""
    k = _skipped_at_or_after(index, ranges)
    return ranges[k][1] if k < len(ranges) and ranges[k][0] <= index else index


def advance(start: int, count: int, ranges) -> int:
    """The raw index of the next window handed out after `count` windows from `start`, jumping over `ranges`
    (never inside one): O(len(ranges))."""
    index = next_unskipped(start, ranges)
    for range_start, range_stop in ranges[_skipped_at_or_after(index, ranges) :]:
        if index + count < range_start:
            break
        count -= range_start - index
        index = range_stop
    return index + count


def windows_of_steps(position: dict, first_step: int, last_step: int) -> list[tuple[int, int]]:
    """The raw [start, stop) ranges that steps first_step..last_step (1-based, after `position`'s global_step)
    train, given the ranges skipped in `position`."""
    step, size = position["global_step"], position["windows_per_step"]
    ranges = merge_ranges(position.get("skipped_windows", []))
    if not step < first_step <= last_step:
        raise ValueError(f"steps {first_step}..{last_step} are not after the position's step {step}")
    begin = advance(position["next_window"], (first_step - 1 - step) * size, ranges)
    end = advance(begin, (last_step - first_step + 1) * size, ranges)
    pieces, index = [], begin
    for range_start, range_stop in ranges:
        if range_stop <= index or range_start >= end:
            continue
        if range_start > index:
            pieces.append((index, range_start))
        index = range_stop
    if index < end:
        pieces.append((index, end))
    return pieces


def windows_needed(total: int, ranges) -> int:
    """The dataset length with which `total` windows are handed out from 0 over `ranges`."""
    return advance(0, total, merge_ranges(ranges))


def data_arguments_for_skips(training_args):
    """`training_args` for building the training data (data/pipeline.py reads max_steps × windows per step): with
    skipped windows in OUTPUT_DIR, a shallow copy whose max_steps covers them too, so that the run still reaches
    its max_steps (the Trainer keeps the original). Without any: `training_args` itself."""
    ranges = read_skipped_windows(training_args.output_dir) if training_args.max_steps > 0 else []
    if not ranges:
        return training_args
    size = windows_per_step(training_args)
    needed = windows_needed(training_args.max_steps * size, ranges)
    widened = copy.copy(training_args)
    widened.max_steps = -(-needed // size)
    logger.info(
        "skipped_windows: %s windows passed over; the data is built for %d steps",
        f"{needed - training_args.max_steps * size:,}",
        widened.max_steps,
    )
    return widened


class WindowSampler(torch.utils.data.Sampler):
    """Global window indices in order, from `start` on the first pass (0 on later ones), over `skipped` ranges.
    A pretraining run has one pass (data/pipeline.py builds max_steps × windows per step, plus the skipped
    windows: `data_arguments_for_skips`); later passes are for datasets shorter than the run (tests, SFT-like use).

    `len()` is a whole pass's (num_windows less the skipped ones), the length of the run never stopped, so the
    Trainer's step arithmetic (steps per epoch, the epoch fraction it logs) is the same after a resume; what the
    resumed pass does not hand out are the windows before `start`, which it never visits."""

    def __init__(self, num_windows: int, start: int = 0, skipped=()):
        self.num_windows, self.start = int(num_windows), int(start)
        self.skipped = merge_ranges(skipped)

    def __len__(self) -> int:
        inside = sum(max(0, min(stop, self.num_windows) - start) for start, stop in self.skipped)
        return self.num_windows - inside

    def __iter__(self):
        index, self.start = self.start, 0  # the resume position is for the first pass only
        k = _skipped_at_or_after(index, self.skipped)
        while index < self.num_windows:
            if k < len(self.skipped) and self.skipped[k][0] <= index:
                index = self.skipped[k][1]
                k += 1
                continue
            stop = min(self.num_windows, self.skipped[k][0] if k < len(self.skipped) else self.num_windows)
            yield from range(index, stop)
            index = stop


def read_position(checkpoint: str) -> dict | None:
    """The checkpoint's data_position.json, or None (a checkpoint written before it existed)."""
    try:
        with open(os.path.join(checkpoint, DATA_POSITION)) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


class DataPosition:
    """The run's position: where this process's sampler started (`start` at `start_step`) and the skipped ranges.

    `resume(checkpoint, training_args)` sets it from a checkpoint; `record(global_step, dataset)` is what goes
    into the checkpoint of a step."""

    def __init__(self, training_args, skipped=()):
        self.windows_per_step = windows_per_step(training_args)
        self.training_args = training_args
        self.start, self.start_step = 0, 0
        self.skipped = merge_ranges(skipped)

    def resume(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        saved = read_position(checkpoint)
        state_step = _global_step(checkpoint)
        if saved is None:
            self.start, self.start_step = advance(0, state_step * self.windows_per_step, self.skipped), state_step
            logger.warning(
                "resume: %s has no %s (written before it existed); its data position is taken as step %d × %d "
                "windows per step of this run", checkpoint, DATA_POSITION, state_step, self.windows_per_step,
            )  # fmt: skip
            return
        self.skipped = merge_ranges([*self.skipped, *saved.get("skipped_windows", [])])
        self.start = next_unskipped(int(saved["next_window"]), self.skipped)
        self.start_step = int(saved["global_step"])
        logger.info(
            "resume: data position %s windows at step %d (saved by %d processes × %d × %d accumulation; now %d × %d "
            "× %d): the sampler starts there, nothing walked",
            f"{self.start:,}", self.start_step, saved.get("world_size"), saved.get("per_device_train_batch_size"),
            saved.get("gradient_accumulation_steps"), self.training_args.world_size,
            self.training_args.per_device_train_batch_size, self.training_args.gradient_accumulation_steps,
        )  # fmt: skip

    def sampler(self, num_windows: int) -> WindowSampler:
        return WindowSampler(num_windows, self.start, self.skipped)

    def next_window(self, global_step: int) -> int:
        return advance(self.start, (global_step - self.start_step) * self.windows_per_step, self.skipped)

    def record(self, global_step: int, dataset=None) -> dict:
        args = self.training_args
        record = {
            "next_window": self.next_window(global_step),
            "global_step": global_step,
            "windows_per_step": self.windows_per_step,
            "world_size": args.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "skipped_windows": [list(pair) for pair in self.skipped],
        }
        schedule = getattr(dataset, "schedule", None)  # a MixtureDataset: windows per source, from its schedule
        if schedule is not None and getattr(dataset, "names", None):
            record["sources"] = dict(zip(dataset.names, schedule.windows_read(record["next_window"])))
        return record


def _global_step(checkpoint: str) -> int:
    with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
        return int(json.load(handle)["global_step"])
