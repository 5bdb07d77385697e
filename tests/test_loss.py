import contextlib
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from test_callbacks import HostReads
from transformers import AutoModelForCausalLM, Starcoder2Config, TrainingArguments

from starcoder2_train.configs import PretrainingArguments, RecipeError
from starcoder2_train.model.presets import MODEL_PRESETS
from starcoder2_train.training import loss
from starcoder2_train.training.loss import (
    check_loss_kernel,
    chunked_causal_lm_loss,
    disable_chunked_loss,
    disable_training_loss,
    enable_chunked_loss,
    enable_training_loss,
    fused_causal_lm_loss,
    gathered,
    is_partitioned,
    resolve_loss_kernel,
)
from starcoder2_train.training.trainer import PretrainingTrainer

VOCAB = 96
FUSED = ["liger", "cut_cross_entropy"]


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = Starcoder2Config(**{**MODEL_PRESETS["test"], "vocab_size": VOCAB, **overrides})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def batch(seed: int = 1, rows: int = 2, length: int = 40):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand(rows, length, generator=generator) < 0.2] = -100  # ignored positions inside rows
    labels[-1, -7:] = -100  # padding at the end of a row
    return {"input_ids": input_ids, "labels": labels}


def loss_and_gradients(model, inputs, **kwargs):
    model.zero_grad()
    loss = model(**inputs, **kwargs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(expected, actual):
    (loss_a, grads_a), (loss_b, grads_b) = expected, actual
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_loss_equals_transformers_loss_and_gradients(chunk_size):
    model, inputs = tiny_model(), batch()
    expected = loss_and_gradients(model, inputs)
    enable_chunked_loss(model, chunk_size)
    assert_same(expected, loss_and_gradients(model, inputs))


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    model, inputs = tiny_model(), batch()
    expected = loss_and_gradients(model, inputs, num_items_in_batch=torch.tensor(123))
    enable_chunked_loss(model, 16)
    assert_same(expected, loss_and_gradients(model, inputs, num_items_in_batch=torch.tensor(123)))


def test_the_function_alone_matches_cross_entropy_of_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    head = torch.nn.Linear(8, 30, bias=True)
    labels = torch.randint(0, 30, (2, 10))
    labels[0, 3] = -100
    full = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1))
    chunked = chunked_causal_lm_loss(hidden, head, labels, chunk_size=3)
    torch.testing.assert_close(chunked, full)
    grad_full = torch.autograd.grad(full, hidden)[0]
    grad_chunked = torch.autograd.grad(chunked_causal_lm_loss(hidden, head, labels, chunk_size=3), hidden)[0]
    torch.testing.assert_close(grad_chunked, grad_full)


def test_logits_are_never_computed_for_more_than_one_chunk():
    model, inputs = tiny_model(), batch(rows=2, length=40)
    rows_seen = []
    model.lm_head.register_forward_hook(
        lambda module, args, output: rows_seen.append(output.reshape(-1, VOCAB).shape[0])
    )
    enable_chunked_loss(model, 16)
    loss_and_gradients(model, inputs)
    assert rows_seen and max(rows_seen) <= 16
    assert sum(rows_seen) == 2 * 80  # every position once forward and once in the backward's recomputation


def test_eval_mode_and_disable_give_the_original_forward():
    model, inputs = tiny_model(), batch()
    enable_chunked_loss(model, 8)
    model.eval()
    with torch.no_grad():
        output = model(**inputs)
    assert output.logits.shape == (2, 40, VOCAB) and output.loss is not None
    disable_chunked_loss(model)
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="loss_chunk_size"):
        enable_chunked_loss(model, 0)


def test_recipe_key_is_validated():
    with pytest.raises(RecipeError, match="loss_chunk_size"):
        PretrainingArguments(output_dir="unused", loss_chunk_size=-1, report_to="none")


def _train_losses(tmp_path, args_class, **extra):
    model = tiny_model(seed=3)
    rows = [{key: value[0] for key, value in batch(seed=s, rows=1).items()} for s in range(8)]
    args = args_class(
        output_dir=str(tmp_path / args_class.__name__),
        max_steps=4,
        per_device_train_batch_size=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        **extra,
    )
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_the_trainer_trains_the_same_with_a_chunked_loss(tmp_path):
    plain = _train_losses(tmp_path, TrainingArguments)
    chunked = _train_losses(tmp_path, PretrainingArguments, loss_chunk_size=8, train_sampling_strategy="random")
    assert len(plain) == 4
    assert chunked == pytest.approx(plain, rel=1e-5)


# The fused kernels (Triton, CUDA) cannot run here: plain-PyTorch stand-ins with their calling conventions
# (liger-kernel 0.8.5, cut-cross-entropy 25.1.1) are installed as the vendor modules, so that everything but
# the kernel itself runs: label shifting, flattening, -100, reduction, dtypes and the call inside lm_head.
class _SavingCrossEntropy(torch.autograd.Function):
    """Cross-entropy of e @ c.T that saves e and c and reads them again in its backward, as CCE does."""

    @staticmethod
    def forward(ctx, e, c, targets, ignore_index, reduction):
        ctx.save_for_backward(e, c, targets)
        ctx.options = ignore_index, reduction
        logits = (e @ c.T).float()
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)

    @staticmethod
    def backward(ctx, grad):
        e, c, targets = ctx.saved_tensors
        ignore_index, reduction = ctx.options
        with torch.enable_grad():
            e, c = e.detach().requires_grad_(), c.detach().requires_grad_()
            logits = (e @ c.T).float()
            loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
            grad_e, grad_c = torch.autograd.grad(loss * grad, (e, c))
        return grad_e, grad_c, None, None, None


def reference_liger_fused_linear_cross_entropy(
    input,
    weight,
    target,
    bias=None,
    ce_weight=None,
    ignore_index=-100,
    lse_square_scale=0.0,
    label_smoothing=0.0,
    reduction="mean",
    softcap=None,
    return_z_loss=False,
    accum_dtype=None,
    use_token_scaling=False,
    return_token_accuracy=False,
    return_predicted_tokens=False,
    chunk_mem_const=1,
):
    """liger_kernel.transformers.functional.liger_fused_linear_cross_entropy in plain PyTorch."""
    assert input.dim() == 2 and target.shape == input.shape[:1] and input.dtype == weight.dtype
    CALLS.append(
        dict(kernel="liger", dtype=input.dtype, weight=weight, reduction=reduction, bias=bias, accum_dtype=accum_dtype)
    )
    logits = torch.nn.functional.linear(input, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def reference_linear_cross_entropy(
    e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False, filter_eps="high", impl="cce"
):
    """cut_cross_entropy.linear_cross_entropy in plain PyTorch (shift: along the last axis of targets)."""
    assert e.shape[:-1] == targets.shape and e.dtype == c.dtype
    CALLS.append(dict(kernel="cut_cross_entropy", dtype=e.dtype, weight=c, reduction=reduction, shift=shift))
    if shift:
        e, targets = e[..., :-1, :], targets[..., 1:]
    return _SavingCrossEntropy.apply(e.flatten(0, -2), c, targets.flatten(), ignore_index, reduction)


CALLS = []


def install_reference_kernels(modules=sys.modules):
    """Put the stand-ins where `training/loss.py` imports the vendor functions from."""
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.functional"):
        modules[name] = types.ModuleType(name)
    modules[
        "liger_kernel.transformers.functional"
    ].liger_fused_linear_cross_entropy = reference_liger_fused_linear_cross_entropy
    modules["cut_cross_entropy"] = types.ModuleType("cut_cross_entropy")
    modules["cut_cross_entropy"].linear_cross_entropy = reference_linear_cross_entropy


@pytest.fixture
def reference_kernels(monkeypatch):
    modules = {}
    install_reference_kernels(modules)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    CALLS.clear()
    yield CALLS
    CALLS.clear()


def shifted_with_holes(labels):
    """shift_labels as a collator could give them: labels shifted left, -100 last and at a few more places."""
    shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].clone()
    shift_labels[:, ::5] = -100
    return shift_labels


@pytest.mark.parametrize("kernel", FUSED)
@pytest.mark.parametrize("given", ["nothing", "num_items_in_batch", "shift_labels", "both"])
def test_fused_path_equals_transformers_loss_and_gradients(reference_kernels, kernel, given):
    model, inputs = tiny_model(), batch()
    extra = {}
    if given in ("num_items_in_batch", "both"):
        extra["num_items_in_batch"] = torch.tensor(123)
    if given in ("shift_labels", "both"):
        extra["shift_labels"] = shifted_with_holes(inputs["labels"])
    expected = loss_and_gradients(model, inputs, **extra)
    enable_training_loss(model, kernel)
    assert_same(expected, loss_and_gradients(model, inputs, **extra))
    (call,) = reference_kernels
    assert call["kernel"] == kernel and call["reduction"] == "sum" and call.get("shift") in (None, False)
    assert call["weight"] is model.lm_head.weight  # as the model holds it: no copy in fp32
    assert call.get("bias") is None


@pytest.mark.parametrize("kernel", FUSED)
def test_fused_path_under_bf16_autocast_gets_bf16_operands(reference_kernels, kernel):
    model, inputs = tiny_model(), batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = loss_and_gradients(model, inputs)
        enable_training_loss(model, kernel)
        actual, grads = loss_and_gradients(model, inputs)
    assert reference_kernels[0]["dtype"] == torch.bfloat16
    # Liger sums the weight's gradient over its chunks in fp32 (then returns it in the weight's dtype, bf16).
    assert reference_kernels[0].get("accum_dtype", torch.float32) == torch.float32
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=0)
    # The cast is differentiable: the fp32 (master) weight gets its gradient in fp32.
    assert grads["model.embed_tokens.weight"].dtype == torch.float32


def test_an_lm_head_bias_goes_to_liger_and_is_refused_by_cut_cross_entropy(reference_kernels):
    model, inputs = tiny_model(), batch()
    model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB))  # StarCoder2 has none; other heads may
    expected = loss_and_gradients(model, inputs, num_items_in_batch=torch.tensor(70))
    enable_training_loss(model, "liger")
    assert_same(expected, loss_and_gradients(model, inputs, num_items_in_batch=torch.tensor(70)))
    assert reference_kernels[0]["bias"] is model.lm_head.bias
    with pytest.raises(RecipeError, match="loss_kernel: cut_cross_entropy takes no lm_head bias"):
        enable_training_loss(model, "cut_cross_entropy")


def test_fused_kernel_runs_inside_lm_head_so_that_module_hooks_fire(reference_kernels):
    model, inputs = tiny_model(), batch()
    outputs = []
    model.lm_head.register_forward_hook(lambda module, args, output: outputs.append(output))
    enable_training_loss(model, "liger")
    loss_and_gradients(model, inputs)
    assert len(outputs) == 1 and outputs[0].dim() == 0  # the summed loss came out of lm_head's own call
    assert "forward" not in model.lm_head.__dict__  # lm_head's forward is its class's again


def test_enable_training_loss_transformers_and_disable(reference_kernels):
    model = tiny_model()
    enable_training_loss(model, "cut_cross_entropy")
    assert model.forward.training_loss_kernel == "cut_cross_entropy"
    enable_training_loss(model, "transformers")
    assert "forward" not in model.__dict__
    enable_chunked_loss(model, 8)
    assert model.forward.chunked_loss_chunk_size == 8
    disable_training_loss(model)
    assert "forward" not in model.__dict__
    with pytest.raises(RecipeError, match="loss_kernel"):
        enable_training_loss(model, "auto")


def test_a_missing_vendor_package_is_a_recipe_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # import fails
    with pytest.raises(RecipeError, match="loss_kernel: cut_cross_entropy needs `pip install cut-cross-entropy`"):
        enable_training_loss(tiny_model(), "cut_cross_entropy")


@pytest.mark.parametrize(
    "requested, chunk_size, device, installed, expected",
    [
        ("auto", 0, "cuda", {"liger", "cut_cross_entropy"}, "liger"),
        ("auto", 4096, "cuda", {"cut_cross_entropy"}, "cut_cross_entropy"),
        ("auto", 4096, "cuda", set(), "chunked"),
        ("auto", 0, "cuda", set(), "transformers"),
        ("auto", 4096, "cpu", {"liger", "cut_cross_entropy"}, "chunked"),
        ("auto", 0, "cpu", {"liger"}, "transformers"),
        ("transformers", 0, "cuda", {"liger"}, "transformers"),
        ("transformers", 1024, "cpu", set(), "chunked"),  # recipes that only set loss_chunk_size
        ("chunked", 1024, "cuda", {"liger"}, "chunked"),
        ("liger", 0, "cuda", {"liger"}, "liger"),
        ("cut_cross_entropy", 4096, "cuda", {"liger", "cut_cross_entropy"}, "cut_cross_entropy"),
    ],
)
def test_resolve_loss_kernel_table(monkeypatch, requested, chunk_size, device, installed, expected):
    monkeypatch.setattr(loss, "_vendor_function", lambda kernel: print if kernel in installed else None)
    assert resolve_loss_kernel(requested, chunk_size, device) == expected


@pytest.mark.parametrize(
    "requested, chunk_size, device, match",
    [
        ("liger", 0, "cpu", "loss_kernel: liger runs Triton kernels on CUDA GPUs only, not on 'cpu'; choose chunked"),
        ("cut_cross_entropy", 0, "mps", "loss_kernel: cut_cross_entropy runs Triton kernels on CUDA"),
        ("liger", 0, "cuda", r"loss_kernel: liger needs `pip install liger-kernel` \(the project's cuda extra\)"),
        ("cut_cross_entropy", 8, "cuda", "loss_kernel: cut_cross_entropy needs `pip install cut-cross-entropy`"),
        ("chunked", 0, "cpu", "loss_kernel: chunked needs loss_chunk_size > 0"),
        ("fastest", 0, "cuda", "loss_kernel: 'fastest' is not one of auto, transformers, chunked"),
    ],
)
def test_resolve_loss_kernel_errors_name_the_key(monkeypatch, requested, chunk_size, device, match):
    monkeypatch.setattr(loss, "_vendor_function", lambda kernel: None)
    with pytest.raises(RecipeError, match=match):
        resolve_loss_kernel(requested, chunk_size, device)


@pytest.mark.parametrize("kernel, chunk_size", [("chunked", 16), ("liger", 0), ("cut_cross_entropy", 0)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_check_loss_kernel_passes_a_correct_kernel_in_under_a_second(reference_kernels, kernel, chunk_size, dtype):
    model = tiny_model()
    start = time.perf_counter()
    errors = check_loss_kernel(model, kernel, chunk_size, "cpu", dtype=dtype)
    assert time.perf_counter() - start < 1.0
    assert errors.keys() == {"loss", "grad_hidden_states", "grad_lm_head_weight"}
    assert max(errors.values()) < (1e-5 if dtype is None else 2e-2)
    assert check_loss_kernel(model, "transformers", 0, "cpu") == {}
    assert model.lm_head.weight.grad is None  # the check works on copies


@pytest.mark.parametrize(
    "broken, match",
    [
        (lambda e, c, t, **kw: reference_linear_cross_entropy(e, c, t, **{**kw, "reduction": "mean"}), "loss "),
        (lambda e, c, t, **kw: reference_linear_cross_entropy(e, c, t.roll(1), **kw), "grad_lm_head_weight"),
    ],
)
def test_check_loss_kernel_names_the_key_and_the_errors_of_a_wrong_kernel(reference_kernels, broken, match):
    sys.modules["cut_cross_entropy"].linear_cross_entropy = broken
    with pytest.raises(RecipeError, match=f"loss_kernel: cut_cross_entropy disagrees .*{match}"):
        check_loss_kernel(tiny_model(), "cut_cross_entropy", 0, "cpu")


def _sum_like_liger(hidden, weight, bias, targets):
    """A sync-free sum, plus the host read liger-kernel 0.8.5 makes (fused_linear_cross_entropy_forward)."""
    (targets != -100).sum().item()
    return _plain_sum(hidden, weight, bias, targets)


def _sum_like_cut_cross_entropy(hidden, weight, bias, targets):
    """A sync-free sum, plus the nonzero() cut-cross-entropy 25.1.1 makes (utils.py:_build_flat_valids)."""
    (targets != -100).nonzero()
    return _plain_sum(hidden, weight, bias, targets)


def _plain_sum(hidden, weight, bias, targets):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


SYNCING_STAND_INS = [(_plain_sum, []), (_sum_like_liger, ["item"]), (_sum_like_cut_cross_entropy, ["nonzero"])]


@pytest.mark.parametrize("kernel_sum, expected", SYNCING_STAND_INS, ids=["none", "liger", "cut_cross_entropy"])
def test_the_loss_code_makes_no_host_read_of_a_device_value(kernel_sum, expected):
    """The chunked loss, and the fused path around a kernel that makes none, call nothing that would make the host
    wait for a GPU (forward and backward, num_items_in_batch given or not): the host reads the fused kernels make
    are their own (loss.py's docstring). The stand-ins that make the vendors' reads show the count would see them."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 24, 8, requires_grad=True)
    head, labels = torch.nn.Linear(8, 30, bias=False), batch(rows=2, length=24)["labels"] % 30
    labels[0, :3] = -100
    losses = []
    with HostReads() as reads:
        for num_items_in_batch in (None, torch.tensor(40)):
            losses.append(fused_causal_lm_loss(hidden, head, labels, kernel_sum, num_items_in_batch))
            if kernel_sum is _plain_sum:
                losses.append(chunked_causal_lm_loss(hidden, head, labels, 7, num_items_in_batch))
        torch.stack(losses).sum().backward()
    assert len(losses) == (4 if kernel_sum is _plain_sum else 2)
    assert [name for name, _ in reads.reads] == expected * 2


def test_only_zero3_partitioned_parameters_are_gathered():
    deepspeed = pytest.importorskip("deepspeed")
    weight = torch.nn.Parameter(torch.zeros(3))
    assert not is_partitioned(weight)
    assert isinstance(gathered([weight, None]), contextlib.nullcontext)
    weight.ds_id = 7  # what DeepSpeed ZeRO-3 gives each parameter it partitions
    assert is_partitioned(weight)
    assert isinstance(gathered([weight, None]), deepspeed.zero.GatheredParameters)


ZERO3_SCRIPT = """
import sys
import torch, deepspeed
from deepspeed.utils import safe_get_full_grad
sys.path.insert(0, {tests!r})
import test_loss
from starcoder2_train.training.loss import check_loss_kernel, enable_training_loss, is_partitioned

test_loss.install_reference_kernels()
config = dict(
    train_micro_batch_size_per_gpu=2,
    zero_optimization=dict(stage=3, stage3_param_persistence_threshold=0),
    optimizer=dict(type="SGD", params=dict(lr=0.0)),
    zero_allow_untested_optimizer=True,
)
for kernel, tied in (("cut_cross_entropy", True), ("liger", False)):
    model, inputs = test_loss.tiny_model(tie_word_embeddings=tied), test_loss.batch()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    extra = dict(num_items_in_batch=torch.tensor(57), shift_labels=test_loss.shifted_with_holes(inputs["labels"]))
    expected_loss, expected_grads = test_loss.loss_and_gradients(model, inputs, **extra)
    model.zero_grad(set_to_none=True)
    enable_training_loss(model, kernel)
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    assert is_partitioned(model.lm_head.weight) and model.lm_head.weight.numel() == 0
    loss = engine(**inputs, **extra).loss
    engine.backward(loss)
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-5, atol=1e-6)
    for name, parameter in model.named_parameters():
        grad = safe_get_full_grad(parameter)
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=kernel + name)
    errors = check_loss_kernel(model, kernel, 0, "cpu")  # gathers the partitioned weight to copy it
    assert max(errors.values()) < 1e-5, errors
    open({out!r} + kernel + str(torch.distributed.get_rank()), "w").write(repr(errors))
# As the training scripts end: otherwise gloo's threads can abort the exit (SIGABRT, "terminate called without
# an active exception") after all of the above passed, failing the run (training/distributed.py says why).
from starcoder2_train.training.distributed import close_process_group
close_process_group(exit_code=0)
"""


@pytest.mark.slow
def test_fused_path_under_deepspeed_zero3_equals_the_plain_loss_and_gradients(tmp_path):
    """2 processes (gloo, CPU), lm_head's weight partitioned (tied and not): the stand-ins (the CCE one reads
    the weight again in its backward) give the plain loss and gradients, and check_loss_kernel gathers."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3.py"
    script.write_text(ZERO3_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "ok-")))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run([*command, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finished = sorted(path.name for path in tmp_path.glob("ok-*"))
    assert finished == ["ok-cut_cross_entropy0", "ok-cut_cross_entropy1", "ok-liger0", "ok-liger1"]
