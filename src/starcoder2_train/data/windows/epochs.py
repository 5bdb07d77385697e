"""Data epochs one after another, each prepared when training first reaches it, once per machine.

A run of `max_steps` reads `max_steps × windows per step` windows: those of data epoch 0, then of epoch 1 (its
own file order and FIM draws), and so on. `DataEpochs` is that sequence as one map-style dataset of exactly
that length. Only epoch 0 is made before step 1: it fixes where epoch 1 starts. Epoch e is made the first time
a window past the end of epoch e-1 is asked for, in whichever process asks (a data-loader worker, usually),
under a file lock per machine and epoch, so that one process of the machine tokenizes and the others then find
datasets' cache. Windows are the same as those of the epochs made in advance and concatenated.

Resuming: the Trainer's sampler skips the windows already trained on without reading them, so a resumed run
makes the epochs it still needs (from the cache, when this machine made them before).
Cost per process: one PackedDataset per epoch reached (its index: an int64 per example) and the epochs'
lengths; the epochs are never all held at once unless the run reaches them all.
"""

import bisect
import multiprocessing
import os
import tempfile

import torch
from filelock import FileLock


class DataEpochs(torch.utils.data.Dataset):
    """`num_windows` windows of epochs 0, 1, 2, ...; `made`: the epochs made already (epoch 0 at least, in order);
    `make_epoch(e)` builds epoch e's PackedDataset when it is first needed.

    make_epoch must be picklable (data-loader workers receive this dataset) and deterministic: every process
    that makes epoch e must get the same windows. `key` names the data (a fingerprint) for the machine's lock.
    """

    def __init__(self, made: list, make_epoch, num_windows: int, key: str):
        if not made or len(made[0]) == 0:
            raise ValueError("DataEpochs: data epoch 0 has no window.")
        self.make_epoch, self.num_windows, self.key = make_epoch, num_windows, key
        self.epochs = dict(enumerate(made))
        self.starts = [0]  # starts[e]: the first window of epoch e; known up to the last made
        for epoch in made:
            self.starts.append(self.starts[-1] + len(epoch))

    def __len__(self) -> int:
        return self.num_windows

    @property
    def epochs_made(self) -> int:
        return len(self.starts) - 1

    def _epoch(self, epoch: int):
        if epoch not in self.epochs:
            lock = os.path.join(tempfile.gettempdir(), f"starcoder2-train-{self.key}-epoch-{epoch}.lock")
            with FileLock(lock):  # one process of this machine tokenizes; the others then read datasets' cache
                self.epochs[epoch] = self.make_epoch(epoch)
        return self.epochs[epoch]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for {self.num_windows} windows")
        while index >= self.starts[-1]:  # past every epoch made: make the next one
            self.starts.append(self.starts[-1] + len(self._epoch(len(self.starts) - 1)))
        epoch = bisect.bisect_right(self.starts, index) - 1
        return self._epoch(epoch)[index - self.starts[epoch]]


def in_worker_process() -> bool:
    """True in a daemonic process (a data-loader worker), which may not start processes of its own."""
    return multiprocessing.current_process().daemon
