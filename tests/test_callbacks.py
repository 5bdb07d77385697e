import time

import pytest
import torch
from transformers import AutoModelForCausalLM, Starcoder2Config, TrainerCallback

from starcoder2_train.configs import SDPA_VARLEN, PretrainingArguments
from starcoder2_train.data.collators import make_collator
from starcoder2_train.model.attention import skip_mask_building
from starcoder2_train.model.flops import model_flops_per_token
from starcoder2_train.model.presets import MODEL_PRESETS
from starcoder2_train.training.throughput import ThroughputCallback, real_lengths
from starcoder2_train.training.trainer import PretrainingTrainer

VOCAB = 96
FIGURES = (
    "tokens_per_second_per_device",
    "tokens_per_second",
    "real_tokens_per_second_per_device",
    "real_tokens_per_second",
    "tflops_per_device_causal",
    "mfu_causal",
    "peak_memory_gb",
    "data_wait_share",
)


def tiny_model():
    torch.manual_seed(0)
    config = Starcoder2Config(**{**MODEL_PRESETS["test"], "vocab_size": VOCAB})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


class Windows(torch.utils.data.Dataset):
    """Packed-style rows of 48 tokens; every other one padded at its end; optionally slow to read."""

    def __init__(self, count: int = 16, delay: float = 0.0):
        self.count, self.delay = count, delay

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        time.sleep(self.delay)
        generator = torch.Generator().manual_seed(index)
        input_ids = torch.randint(0, VOCAB, (48,), generator=generator)
        labels = input_ids.clone()
        position_ids = torch.arange(48)
        if index % 2:
            labels[-8:] = -100
            position_ids[-8:] = torch.arange(8)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def train(tmp_path, dataset, **extra):
    args = PretrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        **extra,
    )
    trainer = PretrainingTrainer(model=tiny_model(), args=args, train_dataset=dataset)
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


def test_real_lengths_from_mask_or_trailing_ignored_labels():
    labels = torch.tensor([[5, 6, -100, 7, -100, -100], [1, 2, 3, 4, 5, 6]])
    assert real_lengths({"labels": labels}).tolist() == [4, 6]  # an ignored label inside a row is not padding
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    assert real_lengths({"labels": labels, "attention_mask": mask}).tolist() == [3, 5]


def test_every_training_log_line_has_the_figures(tmp_path):
    trainer, logs = train(tmp_path, Windows(), peak_flops=1e12)
    assert len(logs) == 3
    for entry in logs:
        for key in FIGURES:
            assert entry[key] > 0, key
        assert 0 <= entry["data_wait_share"] <= 1
        # Each step: rows of 48 and 40 real tokens out of 2 x 48.
        assert entry["real_tokens_per_second"] / entry["tokens_per_second"] == pytest.approx(88 / 96, rel=1e-3)
        config = trainer.model.config
        flops_per_second = (48 * model_flops_per_token(config, 48) + 40 * model_flops_per_token(config, 40)) / (
            96 / entry["tokens_per_second"]
        )
        assert entry["tflops_per_device_causal"] == pytest.approx(flops_per_second / 1e12, rel=1e-3)
        assert entry["mfu_causal"] == pytest.approx(entry["tflops_per_device_causal"], rel=1e-3)  # peak = 1 TFLOP/s
    # The callback runs first, so the figures are in what the other callbacks and the history see.
    assert isinstance(trainer.callback_handler.callbacks[0], ThroughputCallback)


def test_no_mfu_on_a_cpu_without_a_peak(tmp_path):
    _, logs = train(tmp_path, Windows())
    assert "mfu_causal" not in logs[0] and logs[0]["tflops_per_device_causal"] > 0


def test_waiting_for_data_is_measured(tmp_path):
    _, logs = train(tmp_path, Windows(delay=0.1))
    assert logs[-1]["data_wait_share"] > 0.5  # 0.2 s of reading per step against milliseconds of compute


def test_gradient_checkpointing_only_on_the_first_layers(tmp_path):
    trainer, logs = train(
        tmp_path,
        Windows(),
        gradient_checkpointing=True,
        gradient_checkpointing_layers=1,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    flags = [layer.gradient_checkpointing for layer in trainer.model.model.layers]
    assert flags == [True, False] and len(logs) == 3


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every read of a tensor's value into Python (what synchronises with a GPU), with who made it."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            import traceback

            frames = [f"{frame.filename}:{frame.name}" for frame in traceback.extract_stack()[:-1]]
            self.reads.append((name, frames))
        return func(*args, **(kwargs or {}))


def test_no_host_reads_of_device_values_between_log_steps(tmp_path):
    """On a GPU each of these reads would stall the host until the device catches up. Outside log steps the loop
    makes none: no NaN/inf filter on the loss, the gradient norm kept a tensor; the reads left are of host
    tensors by design (the optimizer's CPU step counters, the data pipeline's batches)."""
    args = PretrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=6,
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = tiny_model()
    model.set_attn_implementation(SDPA_VARLEN)
    skip_mask_building(model)  # as create_model does for sdpa_varlen
    trainer = PretrainingTrainer(
        model=model, args=args, train_dataset=Windows(32), data_collator=make_collator(SDPA_VARLEN)
    )
    reads = HostReads()
    steps = []

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(len(reads.reads))

    trainer.add_callback(Mark())
    with reads:
        trainer.train()
    host_side = ("/torch/optim/", "/torch/utils/data/", "/starcoder2_train/data/", "/accelerate/data_loader.py")
    in_steps = reads.reads[: steps[-2]]  # every step before the one that logs
    device_reads = [
        (name, frames[-3:]) for name, frames in in_steps if not any(h in f for f in frames for h in host_side)
    ]
    assert device_reads == []
    # The check can fail: transformers' NaN/inf filter reads the loss of every micro batch, and without the
    # packed marker transformers' mask code reads whether the rows are packed in every forward.
    model = tiny_model()
    model.set_attn_implementation(SDPA_VARLEN)
    trainer = PretrainingTrainer(
        model=model,
        data_collator=make_collator(SDPA_VARLEN),
        args=PretrainingArguments(**{**args.to_dict(), "logging_nan_inf_filter": True, "output_dir": str(tmp_path)}),
        train_dataset=Windows(32),
    )
    reads = HostReads()
    with reads:
        trainer.train()
    bools = [frames for name, frames in reads.reads if name == "__bool__"]
    assert sum(any("transformers/trainer.py" in f for f in frames[-2:]) for frames in bools) >= 12
    assert sum(any("find_packed_sequence_indices" in f for f in frames[-2:]) for frames in bools) >= 12
