"""The evaluation's work split across ranks, and its sums reduced: one definition for the loss and FIM tasks.

Item i of n goes to rank i % world_size. Every rank runs the same number of model calls (`share` pads the shorter
shares with None, which the caller scores as a discarded dummy): under DeepSpeed ZeRO-3 and FSDP each forward
gathers parameters from every rank, so a rank that stopped early would leave the others waiting for ever.
transformers 5.25's `generate` keeps the ranks of one call in step itself (`synced_gpus`, on by default under
ZeRO-3 or FSDP with more than one process: GenerationMixin._extract_generation_mode_kwargs).
"""

import math

import torch
import torch.distributed as dist


def share(count: int, rank: int, world_size: int) -> list[int | None]:
    """This rank's item indices (i % world_size == rank), padded with None to ceil(count / world_size)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size}).")
    mine = list(range(rank, count, world_size))
    return mine + [None] * (math.ceil(count / world_size) - len(mine))


def sum_across_ranks(values: list[float], device, world_size: int) -> list[float]:
    """Element-wise sums of `values` over the ranks (float64 all-reduce on `device`); unchanged with one rank."""
    if world_size == 1:
        return list(values)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size {world_size} but no torch.distributed process group is initialised.")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
