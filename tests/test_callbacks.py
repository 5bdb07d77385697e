import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_ENV
from transformers import AutoModelForCausalLM, Starcoder2Config, TrainerCallback

from starcoder2_train.configs import SDPA_VARLEN, PretrainingArguments
from starcoder2_train.data.batches.collators import make_collator
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
    """Records every call that on a GPU makes the host wait for the device, with who made it: a read of a tensor's
    value into Python, or an op whose output size depends on the values (the host must learn it to allocate).
    Sees Python-level calls only (TorchFunctionMode), which is where the libraries read here make theirs."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "equal"}
    READS |= {"nonzero", "masked_select", "argwhere", "unique", "unique_consecutive"}

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


# One process (gloo, DeepSpeed's CPU accelerator): for each JSON, as shipped (bf16.check_grad_overflow true) and
# with the check off, 3 optimizer steps of 2 micro batches; every host read whose caller is DeepSpeed's
# code, per micro batch (forward + backward + the engine.step that does nothing) and per optimizer step.
DEEPSPEED_READS_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch, deepspeed
from deepspeed.utils import safe_get_full_fp32_param
import test_callbacks, test_deepspeed_configs
from starcoder2_train.training.distributed import close_process_group

torch.set_num_threads(1)
found = {{}}
for name in ("zero1", "zero2", "zero3"):
    for check in (None, False):
        path = test_deepspeed_configs.ROOT / f"accelerate_configs/deepspeed/{{name}}.json"
        config = test_deepspeed_configs.resolved_config(path)
        if check is not None:
            config["bf16"]["check_grad_overflow"] = check
        model = test_callbacks.tiny_model()
        parameters = list(model.parameters())  # as the Trainer groups them: weight decay on matrices only
        groups = [{{"params": [p for p in parameters if p.ndim > 1], "weight_decay": 0.1}},
                  {{"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}}]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-3), config=config)
        micro, steps = [], []
        for step in range(3):
            for index in range(2):
                generator = torch.Generator().manual_seed(index)
                input_ids = torch.randint(0, test_callbacks.VOCAB, (2, 32), generator=generator)
                reads = test_callbacks.HostReads()
                with reads:
                    engine.backward(engine(input_ids=input_ids, labels=input_ids).loss)
                    boundary = engine.is_gradient_accumulation_boundary()
                    engine.step()
                ours = sorted(
                    f"{{read}} in {{frames[-2].rsplit(':', 1)[-1]}} > {{frames[-1].rsplit(':', 1)[-1]}}"
                    for read, frames in reads.reads
                    if "/deepspeed/" in frames[-1].rsplit(":", 1)[0]
                )
                (steps if boundary else micro).append(ours)
        for index in range(2):  # one more step, whose gradient is NaN: skipped, or written into the weights?
            engine.backward(engine(input_ids=input_ids, labels=input_ids).loss * float("nan"))
            engine.step()
        nan_weights = any(safe_get_full_fp32_param(p).isnan().any().item() for p in model.parameters())
        found[f"{{name}} check_grad_overflow={{check}}"] = dict(
            micro_batches=micro, optimizer_steps=steps, nan_weights=nan_weights
        )
        del engine
json.dump(found, open({out!r}, "w"), indent=1)
close_process_group(exit_code=0)  # as the training scripts end: no gloo abort at exit (training/distributed.py)
"""


@pytest.mark.slow
def test_deepspeed_host_reads_per_optimizer_step(tmp_path):
    """What DeepSpeed 0.19.8 reads on the host in bf16 (on a GPU each read waits for the device), counted in real
    engines on the CPU: nothing per micro batch, and per optimizer step a few reads. The JSONs keep
    `check_grad_overflow: true`: turned off, ZeRO-2 saves `has_overflow` (`.item()`) and the step's finiteness test
    (`bool()`) but still reads the norm in `unscale_and_clip_grads` once per parameter group, so the step still waits
    for the GPU once, and a NaN gradient is then written into the weights instead of skipped (asserted here).
    ZeRO-1's BF16_Optimizer (which ignores the key) reads twice per step, ZeRO-3 once
    (accelerate_configs/deepspeed/README.md)."""
    pytest.importorskip("deepspeed")
    script, out = tmp_path / "reads.py", tmp_path / "reads.json"
    script.write_text(DEEPSPEED_READS_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = dict(LAUNCH_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(out.read_text())
    # After the first step (ZeRO-3 then checks its recorded parameter order across ranks, hundreds of reads once):
    # none per micro batch, and per optimizer step the same few each time.
    # A NaN gradient: ZeRO-2 without the check applies the step (NaN weights from then on); the others skip it.
    assert [name for name, counted in found.items() if counted["nan_weights"]] == ["zero2 check_grad_overflow=False"]
    steady = {}
    for name, counted in found.items():
        assert counted["micro_batches"][1:] == [[], []], name
        assert counted["optimizer_steps"][1] == counted["optimizer_steps"][2], name
        steady[name] = counted["optimizer_steps"][2]
    finite_in = "__bool__ in {} > is_invalid_grad_norm".format
    zero1 = sorted([finite_in("step"), "__bool__ in step > clip_tensors_by_global_norm"])
    assert steady == {
        "zero1 check_grad_overflow=None": zero1,  # BF16_Optimizer: the key changes nothing
        "zero1 check_grad_overflow=False": zero1,
        "zero2 check_grad_overflow=None": sorted(  # as shipped: the overflow test, then the norm per group
            [finite_in("step"), *[finite_in("unscale_and_clip_grads")] * 2, "item in _check_overflow > has_overflow"]
        ),
        "zero2 check_grad_overflow=False": [finite_in("unscale_and_clip_grads")] * 2,  # one per parameter group
        "zero3 check_grad_overflow=None": [finite_in("step")],  # bf16 skips has_overflow; the key changes nothing
        "zero3 check_grad_overflow=False": [finite_in("step")],
    }
