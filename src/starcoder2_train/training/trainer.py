"""The project's Trainer: transformers' Trainer, plus throughput reporting and the fast-path recipe keys.

- Every optimizer step's batches, and the time spent waiting for them, go to `ThroughputCallback`, which is
  installed first among the callbacks so that the progress bar, TensorBoard and the log history see its figures.
- `float8`: the decoder's linear layers in float8 (training/float8.py, torchao), before anything is compiled.
- `loss_kernel` / `loss_chunk_size`: the training loss through `loss.enable_training_loss` (fused linear +
  cross-entropy or chunked: no full fp32 logits), checked once against transformers' loss on this device
  (`check_loss_kernel`, a few milliseconds) before training; a kernel that disagrees stops the run.
- `gradient_checkpointing_layers`: with `gradient_checkpointing`, only the first N decoder layers are
  checkpointed; the others keep their activations (set N as small as memory allows).
- `muon`: the decoder layers' matrices step with Muon and the rest with AdamW (training/optimizer.py); refused
  under DeepSpeed and FSDP, which shard what Muon needs whole.
- `compile_layers`: `torch.compile` each decoder layer (regional compilation: the layers share one compiled
  graph, so compiling costs about one layer's time, not the whole model's as `torch_compile` does). Turned off,
  with a warning, under DeepSpeed ZeRO-3 (`compile_layers_allowed`); kept under ZeRO-1/2.
- No host-device synchronisation per micro batch or per step from this Trainer: the gradient norm stays a tensor
  until a log step reads it, and `logging_nan_inf_filter` is off by default (configs/). Left, inside libraries:
  loss_kernel liger (2 per micro batch) and cut_cross_entropy (1; training/loss.py), and DeepSpeed's optimizer
  step (1 to 4 per step: the overflow test kept on, and its gradient norm; accelerate_configs/deepspeed/README.md).
- `spike_detection`: each micro batch's loss and each step's gradient norm go to training/spikes.py's monitor
  on the device; it judges each step a step later (no host wait) and stops the run for a rollback.
- Checkpoints are written under a temporary name, verified, marked complete and renamed, and rotated only then
  (training/checkpoints.py); `run_recipe` (checkpoints.run_recipe) is saved into each one.
- The training windows are handed out by training/data_position.py's `WindowSampler` (with the default
  `train_sampling_strategy: sequential`): each checkpoint records the data position (`data_position.json`), and a
  resume starts the sampler there, on any number of processes, instead of the Trainer walking past the trained
  batches; a checkpoint of another world size is made loadable first (training/reshard.py: DeepSpeed's universal
  checkpoint, converted once by one process).
The keys are read from `PretrainingArguments`; plain `TrainingArguments` give transformers' behaviour.
"""

import logging
import time

import torch
from transformers import Trainer, TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_utils import get_last_checkpoint

from starcoder2_train.configs import RecipeError
from starcoder2_train.training.checkpoints import save_atomically
from starcoder2_train.training.data_position import DATA_POSITION, DataPosition, read_skipped_windows
from starcoder2_train.training.float8 import enable_float8
from starcoder2_train.training.loss import check_loss_kernel, enable_training_loss, resolve_loss_kernel
from starcoder2_train.training.optimizer import muon_with_adamw
from starcoder2_train.training.precision import PrecisionReport
from starcoder2_train.training.reshard import prepare_resharded_load, repair_zero3_load
from starcoder2_train.training.throughput import ThroughputCallback

logger = logging.getLogger(__name__)


def decoder_layers(model) -> list:
    """The repeated blocks transformers checkpoints (GradientCheckpointingLayer), in order."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


class _CheckpointFirstLayers(TrainerCallback):
    """After the Trainer has enabled gradient checkpointing (in train()), keep it on the first N layers only."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # transformers 5.24 renames gradient_checkpointing to activation_checkpointing (the old name still works).
        if getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing:
            for index, layer in enumerate(decoder_layers(model)):
                layer.gradient_checkpointing = index < self.num_layers


class _RecipeIntervals(TrainerCallback):
    """The recipe's logging_steps, eval_steps and save_steps after a resume. transformers 5.25 takes them from the
    checkpoint's trainer_state.json (`_load_or_create_state` replaces the state, and only warns that they differ),
    so a run resumed with a smaller save_steps (fewer steps lost to the next node failure or spike) kept saving at
    the old interval without saying so; this sets the recipe's values again, with one line naming each change."""

    def on_train_begin(self, args, state, control, **kwargs):
        kinds = ("logging_steps", "eval_steps", "save_steps")
        had = {kind: getattr(state, kind) for kind in kinds}
        state.compute_steps(args, state.max_steps)  # transformers' own reading of the recipe's (ratios included)
        for kind in kinds:
            if getattr(state, kind) != had[kind]:
                logger.info("resume: %s %s in the checkpoint's trainer_state.json, %s in the recipe: the recipe's "
                            "is used", kind, had[kind], getattr(state, kind))  # fmt: skip


def prepare_model(model, args) -> None:
    """Apply float8, the loss kernel (checked) and compile_layers to the unwrapped model, in that order: the
    compiled layers must see the float8 linears, and everything before DeepSpeed or accelerate wrap the model."""
    device = args.device
    if getattr(args, "float8", False):
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        names = enable_float8(model, device.type, capability)
        logger.info("float8: %d linear layers converted (lm_head and embeddings stay bf16)", len(names))
    requested = getattr(args, "loss_kernel", "transformers")
    chunk_size = getattr(args, "loss_chunk_size", 0)
    kernel = resolve_loss_kernel(requested, chunk_size, device.type)
    if kernel != "transformers":
        enable_training_loss(model, kernel, chunk_size)
        errors = check_loss_kernel(model, kernel, chunk_size, device, dtype=torch.bfloat16 if args.bf16 else None)
        logger.info("loss kernel %s (loss_kernel: %s), relative errors %s", kernel, requested, errors)
    if getattr(args, "compile_layers", False):
        layers = decoder_layers(model)
        allowed = compile_layers_allowed(args)
        for layer in layers if allowed else ():
            layer.compile()
        logger.info("compile_layers: %d of %d decoder layers compiled", len(layers) if allowed else 0, len(layers))


ZERO3_COMPILE_WARNING = (
    "compile_layers: true is turned off under ZeRO-3 because DeepSpeed's per-module pre-forward hook, which "
    "gathers each Linear's and LayerNorm's sharded parameters, is excluded from compilation: a compiled layer "
    "would break into a graph per submodule instead of being one graph; it stays on under ZeRO-1/2."
)


def compile_layers_allowed(args) -> bool:
    """False (with ZERO3_COMPILE_WARNING logged) when the run's DeepSpeed JSON sets ZeRO stage 3.

    Read from DeepSpeed 0.19.8's source: `DeepSpeedZeRoOffload._register_deepspeed_module`
    (deepspeed/runtime/zero/parameter_offload.py) registers on every submodule a forward pre-hook
    `_pre_forward_module_hook` decorated with `@torch.compiler.disable` (it calls `pre_sub_module_forward_function`,
    whose `PartitionedParameterCoordinator.fetch_sub_module` in partitioned_param_coordinator.py is
    `@compiler.lazy_disable` too). Dynamo cannot trace into a disabled function, so it ends the graph before every
    Linear and LayerNorm of the layer and resumes after: about a dozen graphs per layer with the attention and
    the MLP split apart, which loses what compiling one layer was for. DeepSpeed's own path (`engine.compile`
    with DeepCompile) compiles the whole engine module, not each layer, and its ZeRO-3 passes need CUDA: it is
    not a per-layer graph and cannot be checked here. The stage is read as the dry run reads it
    (`dry_run.deepspeed_settings`: the recipe's `deepspeed` JSON, or accelerate's `deepspeed_config_file`, for
    which accelerate sets no ACCELERATE_DEEPSPEED_ZERO_STAGE).
    """
    from starcoder2_train.training.dry_run import deepspeed_settings  # dry_run imports the model factory

    settings = deepspeed_settings(args) if hasattr(args, "deepspeed") else None
    stage = ((settings or {}).get("zero_optimization") or {}).get("stage", 0)
    if stage == 3 or stage == "3":
        logger.warning(ZERO3_COMPILE_WARNING)
        return False
    return True


class AtomicCheckpoints:
    """Trainer mixin (before the Trainer class in the bases): the Trainer's checkpoint is written into
    OUTPUT_DIR/.incomplete/checkpoint-N with its own rotation off, then verified, marked complete, renamed to
    OUTPUT_DIR/checkpoint-N and rotated (checkpoints.save_atomically). `run_recipe` (set by the subclass) goes
    into every checkpoint as run_recipe.json. PretrainingTrainer and the SFT trainer (sft.py) use it."""

    run_recipe: dict | None = None
    _staging_run_dir: str | None = None

    def _get_output_dir(self, trial):
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        def write(staging_parent):
            self._staging_run_dir, limit = staging_parent, self.args.save_total_limit
            self.args.save_total_limit = None  # rotation counts complete checkpoints only, after the rename
            try:
                super(AtomicCheckpoints, self)._save_checkpoint(model, trial)
            finally:
                self._staging_run_dir, self.args.save_total_limit = None, limit

        save_atomically(self, write, run_dir=super()._get_output_dir(trial))


class PretrainingTrainer(AtomicCheckpoints, Trainer):
    """transformers.Trainer that reports throughput and precision and applies float8, loss_kernel,
    gradient_checkpointing_layers and compile_layers (see the module's docstring)."""

    spike_monitor = None  # training/spikes.py SpikeMonitor.attach sets it (spike_detection: true)

    def __init__(self, model=None, args=None, *more, run_recipe: dict | None = None, **kwargs):
        if args is not None and model is not None:
            prepare_model(model, args)
        self.run_recipe = run_recipe  # written into every checkpoint as run_recipe.json
        super().__init__(model, args, *more, **kwargs)
        self.data_position = DataPosition(self.args, read_skipped_windows(self.args.output_dir))
        self._window_sampler = None
        # First among the callbacks (a given one is moved there), so that the others see its figures.
        callbacks = self.callback_handler.callbacks
        given = [callback for callback in callbacks if isinstance(callback, ThroughputCallback)]
        for callback in given:
            callbacks.remove(callback)
        callbacks[:0] = given or [ThroughputCallback(getattr(self.args, "peak_flops", None))]
        layers = getattr(self.args, "gradient_checkpointing_layers", None)
        if layers == "auto":
            raise RecipeError(
                "gradient_checkpointing_layers: auto must be resolved before the trainer is built "
                "(training.dry_run.resolve_checkpointed_layers, as scripts/run_pretrain.py does)."
            )
        if layers is not None:
            self.add_callback(_CheckpointFirstLayers(layers))
        self.precision_report = PrecisionReport(self)
        self.add_callback(self.precision_report)
        callbacks.insert(1, _RecipeIntervals())  # after the throughput's, before any callback reading the intervals
        if getattr(self.args, "muon", False) and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise RecipeError(
                f"muon: true cannot run under {'DeepSpeed' if self.is_deepspeed_enabled else 'FSDP'}: it hands the "
                "optimizer flattened shards of the parameters and Muon needs whole matrices. Set muon: false, or "
                "train without ZeRO/FSDP (plain DDP: accelerate_configs/ddp.yaml)."
            )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """transformers' train(), with the data position of `resume_from_checkpoint` (a path) read first and a
        checkpoint of another world size made loadable (training/reshard.py) before the engine is built."""
        if resume_from_checkpoint is True:  # transformers' own choice, made here so that the position is read
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, str):
            if not self.args.ignore_data_skip:  # ignore_data_skip: the data starts again at window 0
                self.data_position.resume(resume_from_checkpoint)
            prepare_resharded_load(self, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """transformers' (called right after the engine loaded the checkpoint), then the repair of DeepSpeed's
        ZeRO-3 universal load (training/reshard.py)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_deepspeed_enabled:
            repair_zero3_load(self, checkpoint)

    def _get_train_sampler(self, train_dataset=None):
        """With `train_sampling_strategy: sequential`: the windows in order from the data position
        (training/data_position.py WindowSampler); other strategies: transformers' sampler."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "sequential" or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        self._window_sampler = self.data_position.sampler(len(dataset))
        return self._window_sampler

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """The dataloader as it is when the WindowSampler already starts at the data position (no walk over
        `num_batches`); transformers' skipping otherwise."""
        if self._window_sampler is not None:
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    def checkpoint_records(self) -> dict:
        """JSON files written into every checkpoint besides the Trainer's (training/checkpoints.py)."""
        if self._window_sampler is None:
            return {}
        return {DATA_POSITION: self.data_position.record(self.state.global_step, self.train_dataset)}

    def create_optimizer(self, model=None):
        """transformers' optimizer, or with `muon: true` Muon + AdamW (training/optimizer.py)."""
        if getattr(self.args, "muon", False) and self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = muon_with_adamw(opt_model, self.args, self.get_decay_parameter_names(opt_model))
        return super().create_optimizer(model)

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm as a tensor when there is one: the Trainer reads it (`.item()`, a device sync) only
        on the steps it logs, instead of after every optimizer step as it does under DeepSpeed. The spike
        monitor (training/spikes.py), when there is one, gets it too."""
        if grad_norm is None or not torch.is_tensor(grad_norm):
            grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.spike_monitor is not None:
            self.spike_monitor.set_grad_norm(grad_norm)
        return grad_norm

    def training_step(self, model, inputs, num_items_in_batch=None):
        """transformers' step; its loss also goes to the spike monitor, on the device (no host read)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.spike_monitor is not None:
            self.spike_monitor.add_loss(loss)
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start = time.perf_counter()
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        waited = time.perf_counter() - start
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ThroughputCallback):
                callback.record_batches(batches, waited)
        return batches, num_items_in_batch
