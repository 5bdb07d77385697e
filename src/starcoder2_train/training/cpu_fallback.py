"""A GPU recipe on a machine without a CUDA GPU: what changes, decided once from the recipe's values, before
anything is read or built.

The shipped recipes are written for CUDA GPUs; the same recipe must run where it is opened (a laptop, a CPU
notebook, CI), or be refused at once by key. `fit_to_machine(values, explicit)` is called by RecipeParser.load, so
scripts/run_pretrain.py (run.py), scripts/run_sft.py (sft.py) and the notebook API (api.Recipe) all get the same
decision; run.py and sft.py log `CpuFallback.notice()` once, when the run's logging is set up, as one line:

    no CUDA GPU: bf16 true -> false (fp32 compute: this CPU has no native bf16), load_in_4bit true -> false (...)

Per key, a value from the recipe FILE (written for a GPU) goes on where the run still means the same thing at lower
speed, which is every GPU-only key of the shipped recipes:

- bf16 true: kept as CPU autocast (`use_cpu false -> true`, which transformers 5.25 requires for bf16 without a GPU:
  TrainingArguments._validate_args raises "Your setup doesn't support bf16/gpu" unless use_cpu) where the CPU
  computes bf16 natively (AVX512-BF16 or AMX); else `bf16 true -> false` (fp32 compute), as also under DeepSpeed,
  whose bf16 on CPUs this project has not checked. Measured on 2 AMD EPYC cores with AVX512-BF16 (torch 2.13, LoRA
  r 16 on 4 layers of 1024, 2 x 512 tokens): fp32 4.3 s a step, a bf16 base without autocast 2.6 s, a bf16 base
  under CPU autocast 2.0 s, an fp32 model under CPU autocast 1.8 s, the losses of 6 steps within 0.07 of fp32's
  (bf16's own rounding, as on a GPU). With ATen and oneDNN limited to AVX2 (no native bf16) bf16 is emulated and
  slower than fp32, hence fp32 there. `use_cpu: true` in the recipe keeps bf16 as CPU autocast on any CPU.
- torch_dtype bfloat16 | float16 -> float32 on a CPU without native bf16: a 16-bit base (the LoRA recipes' frozen
  base) computes in 16 bits whatever bf16 says, and emulated 16-bit matmuls are slow: with ATen and oneDNN limited
  to AVX2 on the machine above, a LoRA step over a bf16 base took 45 s against 0.94 s over an fp32 base (4 layers
  of 512). The base then takes twice the memory (a 3B: 12 GB). Kept where the CPU has native bf16, or when set
  explicitly.
- fp16 true -> false (fp32): fp16 mixed precision with loss scaling is a GPU mode.
- tf32 true -> false: TF32 is a matmul mode of NVIDIA Ampere and later (transformers raises for it otherwise).
- load_in_4bit true -> false: QLoRA's 4-bit NF4 base needs bitsandbytes on CUDA; the same LoRA trains over the base
  in torch_dtype (more memory, the same adapters).
- float8 true -> false: torchao's float8 linears need CUDA compute capability 8.9+; the layers train in
  the precision above.
- loss_kernel liger | cut_cross_entropy -> auto: fused CUDA kernels of the same loss; auto is chunked on a CPU
  (loss_chunk_size set) or transformers' loss.
- attn_implementation flash_attention_2 -> auto: the same attention (packed documents kept apart), sdpa_blocked on
  a CPU (choose_attention refuses flash_attention_2 without CUDA).
- flash_attention_impl fa2 | fa3 | fa4 -> auto: it routes PyTorch's CUDA flash kernel; nothing to route on a CPU.

The launcher's FSDP config (accelerate_configs/fsdp.yaml) is named in the same line, `accelerate config FSDP -> DDP`:
accelerate 1.16 makes a CPU process MULTI_CPU and applies FSDP only to GPU ones (AcceleratorState), so the run is
plain data parallel, every process holding the whole model, gradients and optimizer state; nothing said so before.

Kept as they are, because they work on a CPU: compile_layers (inductor compiles the layers for the CPU; it needs a C++
compiler at run time, and its first step took 40 s of a 2-step run of the 3B recipe with model_config test on 2 cores
here: `compile_layers: false` skips it), attn_implementation sdpa_varlen (its CPU path is an exact reference, without
dropout), DeepSpeed (ZeRO trains across CPU processes over gloo), gradient_checkpointing_layers and
gpu_memory_gb (a plan; the CPU's memory is not measured). A 3B, 7B or 15B pretraining from scratch is not refused: it
means the same run, its speed shows on the first logged step (tokens/s), and a size limit would stop the few-step
runs that check a pipeline on a laptop (a smaller model_config makes them quick).

Refused when the run starts (CpuFallback.check, first thing in run.py and sft.py), before any work, with the key
and the value to set (a recipe only parsed, for a plan of GPUs, is not refused):
- a GPU-only value set explicitly (`--load_in_4bit true`, `Recipe(..., float8=True)`): asked for on this machine, it
  cannot be honoured; quietly dropping an explicit request would hide a mistake. (bf16 set explicitly is honoured, as
  CPU autocast.)
- a machine that shows NVIDIA GPUs (/proc/driver/nvidia/gpus) that torch cannot use (a CPU build of torch, a
  driver mismatch) while CUDA_VISIBLE_DEVICES does not hide them: a GPU cluster job would otherwise train on its
  CPUs at a thousandth of the speed without an error. `CUDA_VISIBLE_DEVICES=` (empty) says the CPU is meant.

A dry run (`dry_run: true`) plans for the recipe's GPUs: nothing is changed or refused; only bf16 is taken out for
transformers' sake and kept in `dry_run_bf16` for the plan (training/dry_run.py).
"""

import dataclasses
import os

from starcoder2_train.cli import TRUE_WORDS
from starcoder2_train.configs import RecipeError

NOTICE_PREFIX = "no CUDA GPU"
NVIDIA_GPUS = "/proc/driver/nvidia/gpus"  # one folder per GPU the NVIDIA driver sees


def truthy(value) -> bool:
    """A recipe value as a bool: YAML's booleans, or the command line's words."""
    return value is True or str(value).lower() in TRUE_WORDS


def _word(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object
    reason: str

    def __str__(self) -> str:
        return f"{self.key} {_word(self.old)} -> {_word(self.new)} ({self.reason})"


@dataclasses.dataclass
class CpuFallback:
    """What fit_to_machine changed (in the order of the notice) and, for a dry run, the recipe's bf16."""

    changes: list[Change] = dataclasses.field(default_factory=list)
    dry_run_bf16: bool | None = None
    refusals: list[str] = dataclasses.field(default_factory=list)  # raised by check(), before any work

    def check(self) -> None:
        """Refuse the run (RecipeError, one line) for what cannot be honoured here; run.py and sft.py call it first.
        Parsing alone does not refuse: a plan for GPUs (benchmarks, memory estimates) is parsed on a CPU too."""
        if self.refusals:
            raise RecipeError(" ".join(self.refusals))

    def notice(self) -> str | None:
        """The one line that says every change, or None when nothing changed."""
        return f"{NOTICE_PREFIX}: " + ", ".join(map(str, self.changes)) if self.changes else None

    def log(self, logger) -> None:
        if self.changes:
            logger.warning(self.notice())


# GPU-only values and what they become without CUDA: key -> (is the value GPU-only?, value on a CPU, reason).
_CUDA_ONLY = {
    "fp16": (truthy, False, "fp32 compute: fp16 mixed precision is a GPU mode"),
    "tf32": (truthy, False, "TF32 is a matmul mode of NVIDIA GPUs"),
    "load_in_4bit": (truthy, False, "QLoRA's 4-bit base needs bitsandbytes on CUDA: LoRA over a torch_dtype base"),
    "float8": (truthy, False, "float8 linears need CUDA compute capability 8.9+"),
    "loss_kernel": (
        lambda v: v in ("liger", "cut_cross_entropy"),
        "auto",
        "a fused CUDA kernel of the same loss; auto: chunked on a CPU where loss_chunk_size is set",
    ),
    "attn_implementation": (lambda v: v == "flash_attention_2", "auto", "the same attention, sdpa_blocked on a CPU"),
    "flash_attention_impl": (
        lambda v: v in ("fa2", "fa3", "fa4"),
        "auto",
        "it routes PyTorch's CUDA flash kernel",
    ),
}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), where CPU autocast beats fp32."""
    import torch

    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()) or bool(
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


def hidden_nvidia_gpus() -> list[str]:
    """NVIDIA GPUs the driver sees that CUDA_VISIBLE_DEVICES does not hide (empty when the CPU is meant)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return []
    try:
        return sorted(os.listdir(NVIDIA_GPUS))
    except OSError:
        return []


def _under_deepspeed(values: dict) -> bool:
    return bool(values.get("deepspeed")) or truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false"))


def _unusable_gpus() -> list[str]:
    gpus = hidden_nvidia_gpus()
    if gpus:
        import torch

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
        return [
            f"no CUDA GPU usable, yet the NVIDIA driver shows {len(gpus)} GPU(s) ({NVIDIA_GPUS}): torch "
            f"{torch.__version__} is built with {build}. Install a CUDA build of torch that matches the driver "
            "(nvidia-smi), or set CUDA_VISIBLE_DEVICES= (empty) to train on the CPU on purpose."
        ]
    return []


def _fit_precision(values: dict, explicit, changes: list[Change]) -> None:
    """bf16 (and a 16-bit torch_dtype) as the module docstring says."""
    dtype = values.get("torch_dtype")
    if dtype in ("bfloat16", "float16") and "torch_dtype" not in explicit and not native_cpu_bf16():
        values["torch_dtype"] = "float32"
        why = "a 16-bit base computes in 16 bits, emulated on this CPU: 48x slower than fp32 in a test here"
        changes.append(Change("torch_dtype", dtype, "float32", why))
    if not truthy(values.get("bf16", False)) or truthy(values.get("use_cpu", False)):
        return  # no bf16, or CPU autocast asked for already (transformers accepts bf16 with use_cpu)
    if _under_deepspeed(values):
        values["bf16"] = False
        changes.append(Change("bf16", True, False, "fp32 compute: DeepSpeed on CPUs runs in fp32 here"))
    elif native_cpu_bf16() or "bf16" in explicit:
        values["use_cpu"] = True
        why = "this CPU computes bf16 natively" if native_cpu_bf16() else "bf16 was asked for"
        changes.append(Change("use_cpu", False, True, f"bf16 true kept, as CPU autocast: {why}"))
    else:
        values["bf16"] = False
        changes.append(Change("bf16", True, False, "fp32 compute: this CPU has no native bf16"))


def fit_to_machine(values: dict, explicit=(), *, cuda: bool | None = None) -> CpuFallback:
    """Change `values` (a merged recipe: the file's values, then `explicit` keys from the command line or
    Recipe(...)) in place for a machine without CUDA, as the module docstring says; returns what changed.
    An explicit GPU-only value, or GPUs torch cannot use, go to `refusals` (CpuFallback.check raises them when a run
    starts); the explicit value stays for a plan (tf32, which transformers refuses at parsing, is set false).
    With CUDA: nothing."""
    fit = CpuFallback()
    if cuda_available() if cuda is None else cuda:
        return fit
    if truthy(values.get("dry_run", False)):  # a plan for the recipe's GPUs
        fit.dry_run_bf16 = truthy(values.pop("bf16", False))
        return fit
    fit.refusals += _unusable_gpus()
    for key, (gpu_only, cpu_value, reason) in _CUDA_ONLY.items():
        if key in values and gpu_only(values[key]) and key in explicit:
            fit.refusals.append(
                f"{key}: {_word(values[key])} was asked for, but this machine has no CUDA GPU ({reason}). "
                f"Set {key}: {_word(cpu_value)}, or run on a CUDA GPU."
            )
            if key == "tf32":
                values[key] = cpu_value
    _fit_precision(values, explicit, fit.changes)
    for key, (gpu_only, cpu_value, reason) in _CUDA_ONLY.items():
        if key in values and gpu_only(values[key]) and key not in explicit:
            fit.changes.append(Change(key, values[key], cpu_value, reason))
            values[key] = cpu_value
    if truthy(os.environ.get("ACCELERATE_USE_FSDP", "false")):  # set by `accelerate launch` with an FSDP config
        why = "accelerate applies FSDP to GPU processes only: each process holds the whole model and optimizer"
        fit.changes.append(Change("accelerate config", "FSDP", "DDP", why))
    return fit
