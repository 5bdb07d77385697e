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

`close_process_group(exit_code)` ends a multi-process run cleanly; see its docstring.
"""

import atexit
import ctypes
import dataclasses
import logging
import os
import sys
import threading

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


def close_process_group(exit_code: int | None = None) -> None:
    """Wait for every rank and destroy the process group; with `exit_code`, end a multi-process run here.

    Call it last in a training script, after everything is written. `Trainer.save_model` returns on the
    other ranks as soon as the weights are gathered, while rank 0 is still writing them: the barrier lets
    rank 0 finish before any rank exits.

    Why the run then ends with `os._exit`: 2-process ZeRO-3 runs on the CPU (gloo) sometimes died after
    training and saving had succeeded: "terminate called without an active exception", SIGABRT (-6) on one
    rank, torch elastic's ChildFailedError. Python's faulthandler showed only the main thread, with "<no
    Python frame>" (past the script, finalizing); a SIGABRT handler preloaded into the ranks printed the
    aborting thread's native stack, from its start:
        ProcessGroupGloo::runLoop -> (a finished work item released) -> TensorImpl::decref_pyobject
        -> PyEval_AcquireThread -> pthread_exit -> _Unwind_ForcedUnwind -> std::terminate -> abort
    A gloo worker thread dropped the last reference to a work item whose tensor has a Python object; taking
    the GIL for it while Python finalizes ends the thread (pthread_exit), and that forced unwind through
    C++ code aborts the process. `destroy_process_group` does not stop these threads (torch 2.13 calls
    `shutdown()`, a no-op for gloo; they stop in ProcessGroupGloo's destructor): /proc/self/task still listed
    2 groups x (1 "gloo_tcp_loop" + 2 "pt_gloo_runloop") after it, because DeepSpeed 0.19.8 keeps both
    groups alive (`ds_process_group` on every ZeRO-3 parameter, `deepspeed.utils.groups`, the engine, the
    optimizer, `zero.Init`) until Python tears its modules down. The barrier only narrows the window: the
    worker drops its references after the work's future has completed. (pytorch/pytorch#179291 describes the same
    crash; its destroy-at-exit patch was abandoned, and a destroy does not help here anyway.)

    Releasing every holder is DeepSpeed's business and not reliable from here, and the run's work is done
    by now, so a multi-process run ends before finalization: Python's own shutdown work is done by hand in
    its order (join non-daemon threads, run the atexit handlers, among them logging's flush and close, flush
    Python's and C's standard streams), then `os._exit(exit_code)`. Nothing is left unwritten: the weights,
    tokenizer, metrics and model card are written and closed before this call, rank 0 has finished writing
    when the barrier returns, the Trainer closes TensorBoard at the end of training (transformers 5.25's
    TensorBoardCallback.on_train_end), the final Hub push is synchronous, and the checkpoint uploads had
    their final wait (hub/upload.py's `finish`; one still unfinished runs in a daemon thread, which ends
    with the process as it did before). Only the module teardown and the C++ destructors are skipped, and
    they write nothing.

    Measured with the command of tests/test_compile_layers.py's ZeRO-3 test (2 processes, 2 shared cores,
    PYTHONFAULTHANDLER=1): with the barrier alone, 2 aborts in 68 runs (and 1 in 6 before the barrier);
    ending here, 0 in 114, 40 of them alternated with 40 runs of the barrier alone that aborted once. At
    ~3% the counts alone are weak evidence (0 in 114 at an unchanged 3% would happen about 3% of the
    time); the stack is the stronger one: the abort needs a finalizing interpreter, which a run ending here
    never reaches.

    `exit_code` is the status the run ends with (0 after a finished run, REQUEUE_EXIT_CODE after a stop);
    failures never get here: an exception still propagates and exits non-zero. Without a process group,
    or with one process (the pytest process itself may hold a 1-process group), it only destroys the group
    and returns, so that callers in-process go on.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world_size = dist.get_world_size()
    dist.barrier()
    dist.destroy_process_group()
    if exit_code is not None and world_size > 1:
        _exit_before_finalization(exit_code)


def _exit_before_finalization(exit_code: int) -> None:
    """Do what Python 3.11's Py_FinalizeEx does before its module teardown, in its order, then `os._exit`."""
    # The interpreter's own first step: threading._shutdown() runs the callbacks registered with
    # threading._register_atexit (concurrent.futures' wakes its idle ThreadPoolExecutor workers, which otherwise
    # wait forever for work: a plain join of every non-daemon thread hung a 2-process run after its save), then
    # joins the non-daemon threads.
    threading._shutdown()
    atexit._run_exitfuncs()  # logging.shutdown() among them: handlers flushed and closed
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, closed or replaced streams
            pass
    ctypes.CDLL(None).fflush(None)  # C's stdio buffers (output of C/C++ code), which os._exit does not flush
    os._exit(exit_code)
