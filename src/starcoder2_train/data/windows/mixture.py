"""Windows drawn from several sources by weight: global window i → (source s, the source's own window k).

The Trainer's sampler hands out global window indices (0, 1, 2, ... in a sequential or distributed sampler, each
rank its own), and any data-loader worker may be asked for any of them. So the source of window i must be a
function of (weights, seed, i) alone, cheap to compute, and each source's windows must be used in order, once:
a block schedule.

- The windows are cut into blocks of B = 65,536. Each source gets c_s windows of every block: the weights
  (normalised) times B, rounded by largest remainder so that the counts sum to B, and at least 1 for every source
  (a weight below 1/B, 0.0015%, is raised to that). Realised share of a source over whole blocks: c_s / B, within
  1/B (0.0015 percentage points) of its weight. The last, partial block of a run draws its c_s windows of each
  source without replacement among its positions (a hypergeometric count: standard deviation below
  sqrt(r·w_s(1−w_s)) for r windows in it), so over n windows the share error is below 1/B + sqrt(r·w_s)/n with
  r < B: under 0.4 percentage points from n = B on; a run shorter than a block sees a random sample of the
  shares (200 windows at 0.7/0.3: about ±3 points).
- Inside block b, the positions are a seeded permutation of [0, B) (windows/permutation.py, seed from (seed, b)),
  and a permuted position q lies in source s's range [C_s, C_s + c_s) (C_s: the counts of the sources before s):
  the sources are interleaved uniformly at random inside the block, a different arrangement every block.
- Window i, in block b = i // B at position p = i % B, with q = permutation_b[p] in source s's range, is that
  source's window k = b·c_s + (q − C_s). A source's window k is read at most once, and block b reads all of its
  windows [b·c_s, (b+1)·c_s) by the block's end (in a seeded order inside the block), so the source reads its own
  (shuffled) windows block after block, repeating with new data epochs when it runs out (windows/epochs.py
  DataEpochs, made by data/pipeline.py with exactly the windows it needs: `windows_extent`, the last block read
  in part only up to the highest window it asks for; `windows_read` counts the windows actually read).
Cost per window: one Feistel permutation of a 16-bit index (~10 µs with numpy), and the permutation's keys for
the last block asked for, kept (sequential reads stay in one block). Nothing grows with the number of windows.

One source: the schedule is the identity (window i is the source's window i), so a one-source recipe reads
exactly the windows it read before mixtures existed.
"""

import bisect

import numpy as np
import torch

from starcoder2_train.data.windows.permutation import Permutation

BLOCK = 1 << 16


def apportion(weights: list[float], block: int = BLOCK) -> list[int]:
    """Counts per block: weights × block by largest remainder, each at least 1, summing to `block`."""
    total = float(sum(weights))
    exact = [block * weight / total for weight in weights]
    counts = [max(1, int(value)) for value in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: (exact[s] - int(exact[s]), -s), reverse=True)
    while sum(counts) < block:
        for s in by_remainder:
            if sum(counts) == block:
                break
            counts[s] += 1
    while sum(counts) > block:  # only when the raised minimums overshoot: take from the largest
        counts[counts.index(max(counts))] -= 1
    return counts


class MixtureSchedule:
    """Global window index → (source, source window) for `weights` and `seed`; picklable, the same everywhere."""

    def __init__(self, weights: list[float], seed: int, block: int = BLOCK):
        self.num_sources, self.seed, self.block = len(weights), int(seed), block
        self.counts = apportion(weights, block)
        self.bounds = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # C_s, then block
        self._cached = (None, None)  # (block number, its Permutation)

    def _permutation(self, block_number: int) -> Permutation:
        if self._cached[0] != block_number:
            self._cached = (block_number, Permutation(self.block, self.seed * 1_000_000_007 + block_number))
        return self._cached[1]

    def locate(self, index: int) -> tuple[int, int]:
        """(source s, its window k) of global window `index`."""
        if self.num_sources == 1:
            return 0, index
        block_number, position = divmod(index, self.block)
        q = self._permutation(block_number)[position]
        source = bisect.bisect_right(self.bounds, q) - 1
        return source, block_number * self.counts[source] + q - int(self.bounds[source])

    def sources_of(self, indices) -> np.ndarray:
        """The source of each global window in `indices` (vectorised; for reports and benchmarks)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.num_sources == 1:
            return np.zeros(len(indices), dtype=np.int64)
        out = np.empty(len(indices), dtype=np.int64)
        blocks = indices // self.block
        for block_number in np.unique(blocks):
            where = np.flatnonzero(blocks == block_number)
            q = self._permutation(int(block_number)).take(indices[where] % self.block)
            out[where] = np.searchsorted(self.bounds, q, side="right") - 1
        return out

    def _last_block(self, num_windows: int):
        """(full blocks, each source's permuted positions q in the partial block that ends the first windows)."""
        full, rest = divmod(num_windows, self.block)
        q = self._permutation(full).take(np.arange(rest)) if rest else np.zeros(0, dtype=np.int64)
        return full, q, np.searchsorted(self.bounds, q, side="right") - 1

    def windows_read(self, num_windows: int) -> list[int]:
        """How many windows of each source the first `num_windows` global windows read (exactly)."""
        if self.num_sources == 1:
            return [num_windows]
        full, _, sources = self._last_block(num_windows)
        read = np.array(self.counts, dtype=np.int64) * full + np.bincount(sources, minlength=self.num_sources)
        return [int(n) for n in read]

    def windows_extent(self, num_windows: int) -> list[int]:
        """1 + the highest window of each source that the first `num_windows` global windows read (0: none): the
        length each source's dataset must have."""
        if self.num_sources == 1:
            return [num_windows]
        full, q, sources = self._last_block(num_windows)
        extent = np.array(self.counts, dtype=np.int64) * full
        for source in np.unique(sources):
            extent[source] += int(q[sources == source].max()) - int(self.bounds[source]) + 1
        return [int(n) for n in extent]


class MixtureDataset(torch.utils.data.Dataset):
    """`num_windows` windows, window i from source `schedule.locate(i)`; `sources[s]` holds at least
    `schedule.windows_extent(num_windows)[s]` windows. `source_of(i)` names window i's source (inspect_data);
    the samples themselves are the sources' own (no extra field for the collator to drop)."""

    def __init__(self, sources: list, names: list[str], schedule: MixtureSchedule, num_windows: int):
        self.sources, self.names, self.schedule, self.num_windows = sources, list(names), schedule, num_windows

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for {self.num_windows} windows")
        source, window = self.schedule.locate(int(index))
        return self.sources[source][window]

    def source_of(self, index: int) -> str:
        return self.names[self.schedule.locate(int(index))[0]]


def mixture_rows(names, kinds, weights, read, epoch_windows, seq_length: int) -> list[dict]:
    """Per source: its weight, the windows the run reads from it, their share, tokens (windows × seq_length) and
    passes (windows read / windows in one data epoch of the source)."""
    total = max(1, sum(read))
    return [
        {
            "name": name,
            "kind": kind,
            "weight": weight,
            "windows": windows,
            "share": windows / total,
            "tokens": windows * seq_length,
            "passes": windows / max(1, per_epoch),
        }
        for name, kind, weight, windows, per_epoch in zip(names, kinds, weights, read, epoch_windows)
    ]


def mixture_lines(rows: list[dict]) -> list[str]:
    """The mixture's part of the data report: one line per source."""
    lines = [f"mixture of {len(rows)} sources (weights normalised to sum to 1):"]
    for row in rows:
        lines.append(
            f"  {row['name']} ({row['kind']}): weight {row['weight']:.4f}, share {row['share']:.4f} "
            f"({row['windows']:,} windows, {row['tokens']:,} tokens), {row['passes']:.2f} passes"
        )
    return lines
