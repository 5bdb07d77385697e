"""Make a DeepSpeed launch on a machine without a GPU see the processes it really has.

`accelerate launch` with a DeepSpeed config starts one process per rank and initializes
torch.distributed (gloo on the CPU). transformers' `TrainingArguments` then builds accelerate's
`PartialState`. On a GPU that state reads the process group (world size 8, rank 3, ...). Without a
GPU, and unless `use_cpu` is set, accelerate 1.15 picks no backend and records *one* process. Every
rank then thinks it is the main process, and the run goes wrong without an error:

- every rank reads the same batches (the sampler is sharded over accelerate's process count, 1),
  so 2 ranks train on one rank's data;
- every rank logs (two TensorBoard event files) and writes the Trainer's checkpoint files into the
  same paths (trainer_state.json, training_args.bin, one rng_state.pth instead of one per rank);
  only the weights are written once, because `save_pretrained` checks torch.distributed's rank;
- DeepSpeed "auto" batch sizes come out wrong (train_batch_size = micro batch x 1 process).

Building the arguments with `use_cpu=True` fixes it: accelerate then takes the multi-CPU path,
which reads the world size and rank from the existing process group. The Trainer still trains with
DeepSpeed (its `Accelerator` is created without `cpu=True`). The `ACCELERATE_USE_CPU=true`
environment variable does *not* do the same: the Trainer's `Accelerator` reads it too and then
silently trains with DDP instead of DeepSpeed.

`match_process_group(training_args)` does this. It changes nothing when accelerate already agrees
with torch.distributed, which is always the case on GPU clusters and in one-process runs.

`close_process_group()` ends a multi-process run cleanly; see its docstring.
"""

import dataclasses
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _process_group_size() -> int | None:
    """World size of the initialized torch.distributed process group, or None without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return None


def match_process_group(training_args):
    """Return `training_args`, rebuilt with `use_cpu=True` if accelerate miscounts the processes.

    Call it right after parsing, before the `Trainer` is built. The mismatch is only corrected on a
    machine without CUDA; anywhere else a mismatch is a real misconfiguration and raises.
    """
    world_size = _process_group_size()
    if world_size is None or world_size == training_args.world_size:
        return training_args  # one process, or accelerate already sees every rank (GPU clusters)
    if torch.cuda.is_available() or training_args.use_cpu:
        raise RuntimeError(
            f"torch.distributed has {world_size} processes but accelerate sees {training_args.world_size}; "
            "check the `accelerate launch` config (num_processes, num_machines) and the environment."
        )
    logger.warning(
        "No GPU: accelerate sees %d process(es) of the %d launched; rebuilding the training arguments "
        "with use_cpu=True so that every rank reads its own data and only rank 0 saves.",
        training_args.world_size,
        world_size,
    )
    # dataclasses.replace runs __post_init__ again: the devices, accelerate's state and the
    # DeepSpeed "auto" values are all set up anew from the corrected world size.
    training_args = dataclasses.replace(training_args, use_cpu=True)
    if training_args.world_size != world_size:
        raise RuntimeError(
            f"use_cpu=True did not fix the process count: accelerate sees {training_args.world_size} "
            f"of {world_size} processes."
        )
    return training_args


def close_process_group() -> None:
    """Wait for every rank, then destroy the process group. Call it last in a training script.

    `Trainer.save_model` returns on the other ranks as soon as the weights are gathered, while rank 0
    is still writing them. A process that exits with gloo's worker threads still alive can abort
    ("terminate called without an active exception", pytorch/pytorch#190489); the launcher then
    kills rank 0 halfway through the write. This happened in 1 of 6 ZeRO-3 runs on the CPU here.
    The barrier lets rank 0 finish writing, and destroying the group stops those threads before exit.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
