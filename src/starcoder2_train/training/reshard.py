"""A checkpoint written by another number of processes, made loadable before the engine loads it.

What each engine saves, and how it loads on another world size (read from deepspeed 0.19.8, accelerate 1.16,
transformers 5.25 and torch 2.13's sources):

- One process or DDP: `optimizer.pt` holds the whole optimizer state and `model.safetensors` the whole model;
  they load on any number of processes as they are. Only the RNG states are per rank (`rng_state_R.pth`): a
  rank without its file starts from the seed's state (transformers logs it), which changes nothing but dropout.
- DeepSpeed ZeRO-1/2/3: each rank's partition of the fp32 master weights and optimizer state
  (`global_stepN/*optim_states.pt`, and under ZeRO-3 the parameter shards `*model_states.pt`), cut for the
  world size that wrote them; the engine refuses another one (`_load_zero_checkpoint`: ZeRORuntimeException
  "used a DP world size of 2 but the current world size is 1 ... not currently supported"). DeepSpeed's universal
  checkpoint (deepspeed/checkpoint/ds_to_universal.py) rewrites them per parameter (fp32 weight, exp_avg,
  exp_avg_sq, whole), which any world size loads when the engine's config says `"checkpoint": {"load_universal":
  true}`: the engine then reads the tag from `latest_universal` and each rank slices its own partition.
  `prepare_resharded_load` converts `checkpoint-N/global_stepN` into `checkpoint-N/global_stepN_universal` once
  (global rank 0 converts while the others wait on the gloo group; a conversion already there, named by
  `latest_universal`, is reused by every later resume of any world size; it is written under a temporary name
  and renamed, so a conversion killed half-way is redone) and sets `load_universal` in the DeepSpeed config
  before the Trainer builds the engine. Cost: the conversion reads and writes the optimizer state once (for the
  3B model ~36 GB: minutes on a parallel filesystem, by one process), and doubles the checkpoint's size on disk
  until it is rotated. Refused, naming why: ZeRO with the optimizer offloaded to NVMe (the engine does not load
  ZeRO state then) and DeepSpeed without ZeRO (stage 0: no partitioned state for the converter to read).
  Two defects of DeepSpeed 0.19.8's ZeRO-3 universal load (`DeepSpeedZeroOptimizer_Stage3._load_universal_checkpoint`,
  zero/stage3.py), found here by a 1 -> 2 process resume whose losses drifted (rel 6e-4 two steps later): it puts
  one and the same `step` tensor into the state of every sub-group, which torch's Adam then increments once per
  sub-group each step (2 groups: the bias correction runs at twice the step count), and it copies param group 0's
  hyperparameters (weight_decay among them) onto every group, so the no-decay group decays. `repair_zero3_load`
  (after the engine loaded) gives each state its own step and puts back each group's hyperparameters from the
  universal checkpoint's optimizer_state.pt.
- FSDP (accelerate_configs/fsdp.yaml: FSDP2, `SHARDED_STATE_DICT`): accelerate saves the model and optimizer
  through torch.distributed.checkpoint (`pytorch_model_fsdp_0/`, `optimizer_0/`: each rank's shards with their
  global shapes and offsets in `.metadata`), and DCP's load reads whatever slices the new sharding needs, so it
  loads on another world size as it is (the RNG note above applies); shards saved per rank without DCP
  (`*_rank<R>.bin`, accelerate's `use_dcp=False`, which transformers' Trainer does not use) are refused. Not run
  here: FSDP does not train on this project's CPU test machine.
- A checkpoint of another engine (DeepSpeed's folders with a run that is not DeepSpeed, or the reverse) is refused
  naming both: their optimizer states are different files.
"""

import argparse
import glob
import json
import logging
import os
import shutil

from starcoder2_train.configs import RecipeError
from starcoder2_train.training.data_position import read_position
from starcoder2_train.training.preemption import all_ranks_max

logger = logging.getLogger(__name__)

LATEST_UNIVERSAL = "latest_universal"  # DeepSpeed's name for the file that names the universal tag


def saved_world_size(checkpoint: str) -> int | None:
    """The number of processes that wrote `checkpoint`: its data_position.json, else its RNG files."""
    position = read_position(checkpoint)
    if position is not None and position.get("world_size"):
        return int(position["world_size"])
    ranks = glob.glob(os.path.join(checkpoint, "rng_state_*.pth"))
    if ranks:
        return len(ranks)
    return 1 if os.path.exists(os.path.join(checkpoint, "rng_state.pth")) else None


def _deepspeed_tag(checkpoint: str) -> str | None:
    try:
        with open(os.path.join(checkpoint, "latest")) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return None


def convert_to_universal(checkpoint: str) -> str:
    """`checkpoint/TAG_universal` from DeepSpeed's `checkpoint/TAG`, converted unless it is there already."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # deepspeed is an optional extra

    # inject_missing_state: the converter asserts a `universal_checkpoint_info` entry that only Megatron-DeepSpeed
    # writes; for a model without tensor or pipeline parallelism it is the version alone, added in memory.
    tag = _deepspeed_tag(checkpoint)
    target = os.path.join(checkpoint, f"{tag}_universal")
    latest = os.path.join(checkpoint, LATEST_UNIVERSAL)
    if os.path.isdir(target) and os.path.exists(latest) and open(latest).read().strip() == os.path.basename(target):
        logger.info("resume: %s is converted already (%s)", checkpoint, target)
        return target
    staging = f"{target}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    arguments = argparse.Namespace(
        input_folder=os.path.join(checkpoint, tag), output_folder=staging, num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    ds_to_universal(arguments)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    with open(f"{latest}.tmp", "w") as handle:  # DeepSpeed's main wrote the staging name there
        handle.write(os.path.basename(target))
    os.replace(f"{latest}.tmp", latest)
    return target


def _refuse_other_engine(trainer, checkpoint: str) -> None:
    deepspeed_checkpoint = _deepspeed_tag(checkpoint) is not None
    if deepspeed_checkpoint and not trainer.is_deepspeed_enabled:
        raise RecipeError(
            f"resume: {checkpoint} was written by DeepSpeed (its optimizer state in {_deepspeed_tag(checkpoint)}/) "
            "and this run is not launched with DeepSpeed: launch it with the DeepSpeed config it was trained with."
        )
    if trainer.is_deepspeed_enabled and not deepspeed_checkpoint and not trainer.args.save_only_model:
        raise RecipeError(
            f"resume: {checkpoint} has no DeepSpeed state (no 'latest' file: written without DeepSpeed) and this "
            "run is launched with DeepSpeed: launch it as it was trained (DDP or FSDP), or start a new output_dir."
        )


def prepare_resharded_load(trainer, checkpoint: str) -> None:
    """Make `checkpoint` loadable by this run's world size (see the module's docstring); every rank calls it
    from Trainer.train, before the engine is built."""
    _refuse_other_engine(trainer, checkpoint)
    saved, now = saved_world_size(checkpoint), trainer.args.world_size
    if saved is None or saved == now or trainer.args.save_only_model:
        return
    per_rank = glob.glob(os.path.join(checkpoint, "*_rank[0-9]*.bin"))  # FSDP saved with use_dcp=False
    if trainer.is_fsdp_enabled and per_rank:
        raise RecipeError(
            f"resume: {checkpoint} holds FSDP shards saved per rank ({os.path.basename(per_rank[0])}: torch.save, "
            f"not torch.distributed.checkpoint) by {saved} processes; they load on {saved} processes only. Resume on "
            f"{saved} processes."
        )
    if not trainer.is_deepspeed_enabled:
        engine = "FSDP (torch.distributed.checkpoint reshards at load)" if trainer.is_fsdp_enabled else "DDP"
        logger.info("resume: %s was written by %d processes, loaded by %d: %s", checkpoint, saved, now, engine)
        return
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    offload = (zero.get("offload_optimizer") or {}).get("device")
    if stage == 0 or offload == "nvme":
        why = "DeepSpeed without ZeRO has no partitioned state" if stage == 0 else "ZeRO with its optimizer on NVMe"
        raise RecipeError(
            f"resume: {checkpoint} was written by {saved} processes and this run has {now}; it cannot be resharded "
            f"({why}: DeepSpeed 0.19.8's universal checkpoint does not load it). Resume on {saved} processes."
        )
    error = None
    if trainer.args.process_index == 0:
        try:
            logger.info("resume: %s was written by %d processes, this run has %d: converting it to DeepSpeed's "
                        "universal checkpoint (once, by this process)", checkpoint, saved, now)  # fmt: skip
            convert_to_universal(checkpoint)
        except Exception as caught:  # noqa: BLE001 - every rank raises below, naming the checkpoint
            error = caught
    if all_ranks_max(int(error is not None)):  # the others wait here for the conversion
        why = f"{type(error).__name__}: {error}" if error is not None else "on rank 0, see its log"
        raise RecipeError(
            f"resume: converting {checkpoint} (ZeRO-{stage}, {saved} processes) to DeepSpeed's universal checkpoint "
            f"for {now} processes failed ({why}). "
            f"Resume on {saved} processes."
        ) from error
    config.setdefault("checkpoint", {})["load_universal"] = True
    logger.info("resume: DeepSpeed loads %s through its universal checkpoint (%s)", checkpoint,
                json.dumps(config["checkpoint"]))  # fmt: skip


def repair_zero3_load(trainer, checkpoint: str) -> None:
    """After a ZeRO-3 engine loaded `checkpoint` through its universal checkpoint: one `step` tensor per state and
    each param group's own hyperparameters (the module's docstring says why)."""
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    if not (config.get("checkpoint") or {}).get("load_universal"):
        return
    if int((config.get("zero_optimization") or {}).get("stage", 0)) != 3:
        return
    import torch

    with open(os.path.join(checkpoint, LATEST_UNIVERSAL)) as handle:
        folder = os.path.join(checkpoint, handle.read().strip(), "zero", "optimizer_state.pt")
    saved_groups = torch.load(folder, map_location="cpu", weights_only=False)["optimizer_state_dict"]["param_groups"]
    optimizer = trainer.model_wrapped.optimizer.optimizer  # DeepSpeed's ZeRO-3 optimizer → torch's
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if len(saved_groups) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update({key: value for key, value in saved.items() if key != "params"})
