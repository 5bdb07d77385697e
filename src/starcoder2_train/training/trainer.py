"""The project's Trainer: transformers' Trainer, plus throughput reporting and the fast-path recipe keys.

- Every optimizer step's batches, and the time spent waiting for them, go to `ThroughputCallback`, which is
  installed first among the callbacks so that the progress bar, TensorBoard and the log history see its figures.
- `loss_chunk_size`: the training loss through `loss.enable_chunked_loss` (no full fp32 logits).
- `gradient_checkpointing_layers`: with `gradient_checkpointing`, only the first N decoder layers are
  checkpointed; the others keep their activations (set N as small as memory allows).
- `compile_layers`: `torch.compile` each decoder layer (regional compilation: the layers share one compiled
  graph, so compiling costs about one layer's time, not the whole model's as `torch_compile` does).
The keys are read from `PretrainingArguments`; plain `TrainingArguments` give transformers' behaviour.
"""

import time

from transformers import Trainer, TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from starcoder2_train.training.loss import enable_chunked_loss
from starcoder2_train.training.throughput import ThroughputCallback


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


class PretrainingTrainer(Trainer):
    """transformers.Trainer that reports throughput and applies loss_chunk_size, gradient_checkpointing_layers
    and compile_layers (see the module's docstring)."""

    def __init__(self, model=None, args=None, *more, **kwargs):
        if args is not None and getattr(args, "loss_chunk_size", 0):
            enable_chunked_loss(model, args.loss_chunk_size)
        if args is not None and getattr(args, "compile_layers", False):
            for layer in decoder_layers(model):
                layer.compile()
        super().__init__(model, args, *more, **kwargs)
        # First among the callbacks (a given one is moved there), so that the others see its figures.
        callbacks = self.callback_handler.callbacks
        given = [callback for callback in callbacks if isinstance(callback, ThroughputCallback)]
        for callback in given:
            callbacks.remove(callback)
        callbacks[:0] = given or [ThroughputCallback(getattr(self.args, "peak_flops", None))]
        layers = getattr(self.args, "gradient_checkpointing_layers", None)
        if layers is not None:
            self.add_callback(_CheckpointFirstLayers(layers))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start = time.perf_counter()
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        waited = time.perf_counter() - start
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ThroughputCallback):
                callback.record_batches(batches, waited)
        return batches, num_items_in_batch
