"""The mixture benchmark: N windows of a weighted mixture read as training reads them (scripts/benchmark_data.py
--mixture N).

Sources are synthetic (window k of source s is the pair [s, k]), so that what is measured is the mixture's own
mapping (data/windows/mixture.py), not tokenization: realised shares against the weights, whether each rank's
windows are disjoint and all windows read, and whether every (ranks, loader workers) combination reads the same
(source, source window) for every global window as one process without workers. Ranks are simulated as the
Trainer's prepared loader shards batches of a sequential sampler (accelerate's BatchSamplerShard); each rank's
DataLoader runs with 0, 1 or 2 worker processes.
"""

import time

import numpy as np
import torch

from starcoder2_train.data.windows.mixture import MixtureDataset, MixtureSchedule


class SyntheticSource(torch.utils.data.Dataset):
    """Window k of source s is the int64 pair [s, k]; refuses a window past its length (as a real source would)."""

    def __init__(self, source: int, length: int):
        self.source, self.length = source, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"window {index} past the {self.length} windows of source {self.source}")
        return torch.tensor([self.source, index])


def _rank_reads(dataset, ranks: int, rank: int, workers: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(global indices, [source, window] rows) that `rank` of `ranks` reads."""
    from accelerate.data_loader import BatchSamplerShard

    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), batch, drop_last=False)
    shard = BatchSamplerShard(batches, num_processes=ranks, process_index=rank, even_batches=False)
    indices = np.array([index for indices in shard for index in indices], dtype=np.int64)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=shard, num_workers=workers)
    rows = torch.cat(list(loader)).numpy() if len(indices) else np.zeros((0, 2), dtype=np.int64)
    return indices, rows


def mixture_benchmark(num_windows: int, weights: list[float], seed: int = 0, batch: int = 64) -> dict:
    schedule = MixtureSchedule(weights, seed)
    start = time.perf_counter()
    located = [schedule.locate(i) for i in range(num_windows)]
    locate_seconds = time.perf_counter() - start
    reference = np.array(located, dtype=np.int64)
    counts = np.bincount(reference[:, 0], minlength=len(weights))
    total = float(sum(weights))
    shares = (counts / num_windows).tolist()
    extents = schedule.windows_extent(num_windows)
    dataset = MixtureDataset(
        [SyntheticSource(s, n) for s, n in enumerate(extents)],
        [str(s) for s in range(len(weights))],
        schedule,
        num_windows,
    )
    runs = []
    for ranks in (1, 2, 4):
        for workers in (0, 1, 2):
            start = time.perf_counter()
            reads = [_rank_reads(dataset, ranks, rank, workers, batch) for rank in range(ranks)]
            seconds = time.perf_counter() - start
            indices = np.concatenate([index for index, _ in reads])
            rows = np.concatenate([row for _, row in reads])
            disjoint = len(np.unique(indices)) == len(indices)
            same = len(indices) == num_windows and bool((rows[np.argsort(indices)] == reference).all())
            runs.append(
                {"ranks": ranks, "workers": workers, "disjoint": disjoint, "same_windows": same, "seconds": seconds}
            )
    return {
        "num_windows": num_windows,
        "weights": [w / total for w in weights],
        "block": schedule.block,
        "counts_per_block": schedule.counts,
        "realised_shares": shares,
        "max_share_error": max(abs(share - w / total) for share, w in zip(shares, weights)),
        "windows_per_source": counts.tolist(),
        "locate_per_second": num_windows / locate_seconds,
        "runs": runs,
    }


def print_mixture(figures: dict) -> None:
    weights, shares = figures["weights"], figures["realised_shares"]
    print(f"mixture of {len(weights)} sources, {figures['num_windows']:,} windows (block {figures['block']:,}):")
    for source, (weight, share, count) in enumerate(zip(weights, shares, figures["windows_per_source"])):
        print(f"  source {source}: weight {weight:.4f}, realised share {share:.5f} ({count:,} windows)")
    print(f"  largest share error: {100 * figures['max_share_error']:.4f} percentage points")
    print(f"  window -> source lookups: {figures['locate_per_second']:,.0f} per second (one process)")
    for run in figures["runs"]:
        print(
            f"  {run['ranks']} rank(s) x {run['workers']} loader worker(s): each rank's windows disjoint: "
            f"{run['disjoint']}; the same windows as 1 process: {run['same_windows']} ({run['seconds']:.1f} s)"
        )
