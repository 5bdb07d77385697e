"""The training keys (`PretrainingArguments`): transformers' `TrainingArguments` plus this project's own
(training-time evaluation, the dry run and its memory plan, the loss kernel, float8, gradient-checkpointing layers,
compile_layers, Muon, peak FLOP/s); with the values loss_kernel and fim_eval_mode may take. The one module of
configs/ that imports transformers.
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from starcoder2_train.configs.shared import TRAINING_EVAL_TASKS, RecipeError

# Training-loss kernels (training/loss.py): auto picks the fastest one this machine has.
LOSS_KERNELS = ("auto", "transformers", "chunked", "liger", "cut_cross_entropy")
FIM_EVAL_MODES = ("psm", "spm")  # the FIM evaluation's prompt orders (evaluation/fim.py)


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
        default=200,
        metadata={
            "help": "Single-line FIM problems of each evaluation, drawn by seed a language at a time (round robin) "
            "and, within a language, from a different repository each file while there is one "
            "(evaluation/held_out_set.py)."
        },
    )
    eval_tokens_per_language: int = field(
        default=2_000_000,
        metadata={
            "help": "Held-out tokens per language scored by the loss task: files drawn by seed across the held-out "
            "repositories (one per repository first), the last one cut at the bound; 0 scores every held-out "
            "file. 2M: 17 languages x 2M = 34M tokens forward, 0.09% of the training time between two "
            "evaluations of the 3B recipe on 160 GPUs (--dry_run true prints the whole evaluation's share), "
            "and ~1,000 files of ~2k tokens a language, whose per-file spread "
            "(~0.5 nats, UNVERIFIED) gives a standard error of ~0.016 nats on a language's loss."
        },
    )
    eval_languages: int = field(
        default=32,
        metadata={
            "help": "The held-out set keeps the languages with the most held-out files, at most this many (ties by "
            "name; 0: every language): a recipe without a language filter (The Stack v2: 600+) scores the "
            "languages that have enough files for a figure, and its cost stays bounded."
        },
    )
    eval_loss_windows: int = field(
        default=0,
        metadata={
            "help": "Packed held-out windows of the Trainer's own eval_loss, drawn by seed from the held-out split "
            "(0: all of them, eval_fraction of the corpus: ~150k windows of 4k, 1.5% of the 3B recipe's training "
            "time, before this bound)."
        },
    )
    eval_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the held-out set, built once per machine and memory-mapped by every rank "
            "(evaluation/held_out_set.py). Unset: OUTPUT_DIR/held_out."
        },
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

    spike_detection: bool = field(
        default=False,
        metadata={
            "help": "Judge every optimizer step (training/spikes.py): a non-finite loss or gradient norm on any "
            "rank, or a mean loss above spike_factor x the median of the last spike_window steps, stops the run "
            "without saving; the windows of the last spike_skip_steps steps are added to "
            "OUTPUT_DIR/skipped_windows.json and the run exits with status 76; the same command resumes from the "
            "newest complete checkpoint, which is from before the spike. No host wait: each step is read a step "
            "late, and at once before a save."
        },
    )
    spike_factor: float = field(
        default=2.0,
        metadata={"help": "With spike_detection: a step whose loss exceeds this many times the recent median is a "
                  "spike (> 1)."},
    )  # fmt: skip
    spike_window: int = field(
        default=100,
        metadata={"help": "With spike_detection: the median is over this many accepted steps (>= 1); no step is "
                  "judged by it before the window is full, after the start or a resume without one."},
    )  # fmt: skip
    spike_skip_steps: int = field(
        default=1,
        metadata={"help": "With spike_detection: the windows of this many steps, ending with the spike, are skipped "
                  "after the rollback (>= 1; PaLM skipped 200-500 batches; never before the checkpoint resumed)."},
    )  # fmt: skip
    max_rollbacks: int = field(
        default=3,
        metadata={"help": "With spike_detection: a spike after this many rollbacks of the output_dir stops the run "
                  "with an error naming each rolled-back step (>= 0; 0: the first spike stops it)."},
    )  # fmt: skip

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
        bounds = {
            key: getattr(self, key) for key in ("eval_tokens_per_language", "eval_languages", "eval_loss_windows")
        }
        for key, value in bounds.items():
            if value < 0:
                raise RecipeError(f"{key}: must be 0 (no bound) or positive, got {value}.")
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
        check_spike_keys(self)


def check_spike_keys(args) -> None:
    """Each spike key in its range, refused by name (checked whether or not spike_detection is on)."""
    rules = (
        ("spike_factor", args.spike_factor > 1, "a number above 1 (2.0: twice the recent median)"),
        ("spike_window", args.spike_window >= 1, "a number of steps, at least 1"),
        ("spike_skip_steps", args.spike_skip_steps >= 1, "a number of steps, at least 1"),
        ("max_rollbacks", args.max_rollbacks >= 0, "0 or more"),
    )
    for key, good, what in rules:
        if not good:
            raise RecipeError(f"{key}: must be {what}, got {getattr(args, key)!r}.")
