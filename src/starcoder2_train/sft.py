"""Instruction fine-tuning (SFT) of a StarCoder2 checkpoint with LoRA through TRL's SFTTrainer (TRL 1.16).

    messages rows → checked (load_messages) → chat template (set_chat_template) → TRL: tokens and assistant masks
    → labels → packed rows (bfd_split) → padding-free batches → the model with LoRA, on this project's attention

Data: JSONL files (or a directory of them), read here line by line so that a bad row is named by file and line, or
a Hub dataset (rows named by split and index). A row without messages or assistant turn, with an unknown role,
non-string content or special-token text (the template is tokenized with special tokens parsed: a literal
`<|endoftext|>` would end the turn) is refused (`bad_rows: error`) or skipped and counted by reason (`skip`).

Chat template: StarCoder2's base tokenizer has none. DEFAULT_CHAT_TEMPLATE renders the plain-text format of
bigcode/starcoder2-15b-instruct-v0.1 (`### Instruction` / `### Response`, each response ended by `<|endoftext|>`,
where StarCoder2 already stops generating), with an optional system message as a preamble. It adds no token: under
LoRA the embeddings are frozen, and new chat tokens would keep untrained rows. Its `{% generation %}` span, from which
transformers' `return_assistant_tokens_mask` and TRL's `assistant_only_loss` set labels -100 everywhere else, is the
newline after `### Response`, the content and `<|endoftext|>`; the generation prompt ends at `### Response`. So the
span starts after a letter, where StarCoder2's byte-level pre-tokenizer always cuts, and the mask is exact whatever a
response opens with (after the newline, indented code's spaces would merge with it into one token). It is saved with
the output's tokenizer.

Packing reuses this project's mechanism rather than adding a packer: a packed row holds several samples whose
`position_ids` restart at 0 at each sample, with no attention_mask and the first token of each sample no target; the
kernels of model/attention.py (sdpa_blocked, sdpa_varlen) read the samples from those positions or `cu_seq_lens`.
TRL's padding-free collator produces literally that: one flattened row as `PackedCollator(flatten=True)` makes it,
position_ids from each packed row's `seq_lengths`, labels -100 where they restart, and `cu_seq_lens_q/k`,
`max_length_q/k` as `document_boundaries` computes them (tests/test_sft.py checks both; TRL refuses another collator
for padding-free batches). TRL's `bfd_split` chooses which samples share a row: whole samples, best fit, and one
longer than seq_length cut into seq_length pieces, as data/windows/packing.py continues a long example in the next
window.

TRL behaviour worked around (SFTTrainingArguments): its default packing `bfd` and `packing: false` truncate at
max_length and `wrapped` loses the sample boundaries, so only bfd_split is taken; bf16 and checkpointing are off unless
a recipe turns them on; `chat_template_path` must be a Jinja file (a tokenizer's template comes with new tokens).
"""

import dataclasses
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.compute as pc
from transformers import HfArgumentParser, set_seed
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from starcoder2_train.configs import ModelArguments, RecipeError, hub_hint, is_hub_id
from starcoder2_train.data.special_tokens import STARCODER2_SPECIAL_TOKENS
from starcoder2_train.data.tokens.tokenizer import load_tokenizer
from starcoder2_train.model.factory import choose_attention, validate_model_and_data
from starcoder2_train.model.presets import build_config
from starcoder2_train.recipe import RecipeParser
from starcoder2_train.run import build_model, configure_logging, save_final_model
from starcoder2_train.training.checkpoints import resolve_resume, run_recipe
from starcoder2_train.training.distributed import close_process_group
from starcoder2_train.training.preemption import PreemptionCallback
from starcoder2_train.training.trainer import AtomicCheckpoints


class ProjectSFTTrainer(AtomicCheckpoints, SFTTrainer):
    """TRL's SFTTrainer with this project's checkpoints: staged, verified, marked complete, renamed, and the run's
    recipe in each (training/checkpoints.py), so that a restart never picks a half-written one."""

    def __init__(self, *args, run_recipe: dict | None = None, **kwargs):
        self.run_recipe = run_recipe
        super().__init__(*args, **kwargs)


logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
BAD_ROWS = ("error", "skip")
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ '### Instruction\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '### Response' }}"
    "{% generation %}{{ '\\n' + message['content'] + eos_token }}{% endgeneration %}{{ '\\n\\n' }}"
    "{%- else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '### Response' }}{%- endif %}"
)


@dataclass
class SFTArguments:
    """The messages dataset and how it becomes training rows."""

    dataset_name_or_path: str | None = field(
        default=None, metadata={"help": "Messages rows: a JSONL file, a directory of *.jsonl files, or a Hub id."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset to train on."})
    messages_field: str = field(default="messages", metadata={"help": "The field of a row holding its messages."})
    bad_rows: str = field(
        default="error", metadata={"help": "A bad row (load_messages): error (refuse, naming it) or skip (count it)."}
    )
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N good rows (quick runs)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer; unset: model_name_or_path's own (RecipeParser.parse)."}
    )

    def __post_init__(self):
        if not self.dataset_name_or_path:
            raise RecipeError("dataset_name_or_path: set a JSONL file or directory of messages rows, or a Hub id.")
        if self.bad_rows not in BAD_ROWS:
            raise RecipeError(f"bad_rows: {self.bad_rows!r} is not one of {', '.join(BAD_ROWS)}.")
        if self.max_samples is not None and self.max_samples < 1:
            raise RecipeError(f"max_samples: must be at least 1, got {self.max_samples}.")


@dataclass
class SFTTrainingArguments(SFTConfig):
    """TRL's SFTConfig, packed without dropping a token, on assistant turns only (module docstring)."""

    packing: bool = field(default=True, metadata={"help": "Always true here: samples packed into seq_length rows."})
    packing_strategy: str = field(
        default="bfd_split", metadata={"help": "Always bfd_split here: best-fit rows, long samples cut, none dropped."}
    )
    assistant_only_loss: bool = field(
        default=True, metadata={"help": "true: loss on assistant turns only; false: on whole conversations."}
    )
    seq_length: int = field(
        default=4096, metadata={"help": "Tokens per packed row (TRL's max_length); a longer sample is cut in pieces."}
    )
    max_length: int | None = field(default=None, init=False)  # seq_length, set in __post_init__
    # TRL 1.16 defaults bf16 to true (refused on a CPU) and gradient_checkpointing to true (transformers 5.24's
    # deprecated alias of activation_checkpointing): both back to transformers' defaults; recipes set them.
    bf16: bool = field(default=False, metadata={"help": "Train in bf16 mixed precision (a GPU)."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing.", "nargs": "?", "const": True}
    )
    trust_remote_code: bool = field(default=False, init=False)  # from ModelArguments.trust_remote_code

    def __post_init__(self):
        super().__post_init__()
        self.max_length = self.seq_length
        if self.seq_length < 16:
            raise RecipeError(f"seq_length: must be at least 16 tokens, got {self.seq_length}.")
        if not self.packing:
            raise RecipeError(
                "packing: must be true; TRL 1.16 truncates unpacked samples to max_length, dropping tokens."
            )
        if self.packing_strategy != "bfd_split":
            raise RecipeError(
                f"packing_strategy: {self.packing_strategy!r} is refused: bfd truncates samples longer than "
                "seq_length and wrapped loses the sample boundaries (samples would attend across); use bfd_split."
            )
        if self.chat_template_path and not self.chat_template_path.endswith((".jinja", ".j2")):
            raise RecipeError(
                f"chat_template_path: {self.chat_template_path} must be a .jinja file; a tokenizer's template would "
                "be cloned with new tokens, whose embeddings LoRA does not train."
            )


class SFTRecipeParser(RecipeParser):
    """RecipeParser for (ModelArguments, SFTArguments, SFTTrainingArguments): YAML recipe plus `--key value`."""

    def __init__(self):
        HfArgumentParser.__init__(self, (ModelArguments, SFTArguments, SFTTrainingArguments))
        self.dry_run_bf16 = None
        self.known_keys = {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.init}

    def parse(self, argv: list[str] | None = None):
        """RecipeParser.parse; transformers' own refusals of a training key (a ValueError) become RecipeErrors."""
        try:
            return super().parse(argv)
        except RecipeError:
            raise
        except ValueError as error:
            raise RecipeError(f"recipe: {error}") from error


@dataclass
class RowReport:
    """Rows read from a messages dataset: kept, and skipped by reason with the first place each reason was seen."""

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_seen: dict = field(default_factory=dict)
    limited: bool = False  # reading stopped at max_samples

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first_seen.setdefault(reason, where)

    def summary_lines(self) -> list[str]:
        lines = [f"{self.source}: kept {self.kept:,} rows, skipped {sum(self.skipped.values()):,}"]
        lines[0] += " (max_samples reached: later rows not read)" if self.limited else ""
        lines += [f"skipped {n:,}: {reason} (first: {self.first_seen[reason]})" for reason, n in self.skipped.items()]
        return lines

    def as_metrics(self) -> dict[str, int]:
        return {"sft_rows": self.kept, "sft_rows_skipped": sum(self.skipped.values())}


def row_problem(row, messages_field: str, special_text: re.Pattern | None = None) -> tuple[str, str] | None:
    """(reason, detail) of what makes `row` (a parsed JSON value) unusable, or None for a good row; `special_text`
    finds the text no content may hold."""
    if not isinstance(row, dict):
        return "not a JSON object", type(row).__name__
    messages = row.get(messages_field)
    if not isinstance(messages, list) or not messages:
        return "no messages", f"{messages_field!r} missing, empty or not a list"
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return "message without role and content", f"message {number}"
        if message["role"] not in ROLES:
            return "unknown role", f"message {number} has role {message['role']!r}, not one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return "non-string content", f"message {number} content is {type(message['content']).__name__}"
        found = special_text.search(message["content"]) if special_text else None
        if found:
            return "content holds special-token text", f"message {number} holds {found.group()!r}"
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant turn", "nothing to train on"
    return None


def _local_rows(path: str):
    """(where, row, JSON error or None) of every non-blank line of a JSONL file or of the *.jsonl files of a
    directory, in name order; `where` is file:line."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".jsonl"))
    if not files:
        raise RecipeError(f"dataset_name_or_path: {path} holds no .jsonl file.")
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield f"{file}:{line_number}", json.loads(line), None
                    except json.JSONDecodeError as error:
                        yield f"{file}:{line_number}", None, f"{error.msg} at column {error.colno}"


def _hub_rows(dataset_id: str, split: str):
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise RecipeError(
            f"dataset_name_or_path: could not load {dataset_id} ({error}); {hub_hint(dataset_id)}."
        ) from error
    for index, row in enumerate(rows):
        yield f"{dataset_id} split {split} row {index}", row, None


def load_messages(
    path_or_id: str,
    *,
    split: str = "train",
    messages_field: str = "messages",
    bad_rows: str = "error",
    max_samples: int | None = None,
    special_tokens=STARCODER2_SPECIAL_TOKENS,
):
    """Good rows as a datasets.Dataset with one `messages` column (role and content only), and their RowReport.

    `bad_rows="error"`: RecipeError naming every bad row's place and reason (the first 5). "skip": bad rows left
    out and counted. `special_tokens`: texts no content may hold (the tokenizer's added tokens).
    """
    from datasets import Dataset

    if os.path.exists(path_or_id):
        source = _local_rows(path_or_id)
    elif is_hub_id(path_or_id):
        source = _hub_rows(path_or_id, split)
    else:
        raise RecipeError(f"dataset_name_or_path: {hub_hint(path_or_id)}.")
    tokens = sorted(special_tokens, key=len, reverse=True)
    special_text = re.compile("|".join(map(re.escape, tokens))) if tokens else None
    report, rows, refused = RowReport(path_or_id), [], []
    for where, row, json_error in source:
        problem = ("invalid JSON", json_error) if json_error else row_problem(row, messages_field, special_text)
        if problem:
            report.skip(problem[0], where)
            refused.append(f"{where}: {problem[0]} ({problem[1]})")
            continue
        rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in row[messages_field]]})
        report.kept += 1
        if max_samples is not None and report.kept >= max_samples:
            report.limited = True
            break
    if refused and bad_rows == "error":
        raise RecipeError(
            f"dataset_name_or_path: {len(refused)} bad row(s) in {path_or_id}: " + "; ".join(refused[:5])
            + ". Fix them, or set bad_rows: skip to leave them out (counted in the log)."
        )  # fmt: skip
    if not rows:
        raise RecipeError(
            f"dataset_name_or_path: no usable row in {path_or_id} ({'; '.join(report.summary_lines())})."
        )
    return Dataset.from_list(rows), report


def set_chat_template(tokenizer, chat_template_path: str | None = None, assistant_only_loss: bool = True) -> str:
    """Give `tokenizer` its chat template: the Jinja file `chat_template_path`, else its own, else
    DEFAULT_CHAT_TEMPLATE; returns which. With `assistant_only_loss` the template must mark the responses with
    `{% generation %}` (or be one TRL knows how to mark: get_training_chat_template), else RecipeError."""
    if chat_template_path:
        if not os.path.isfile(chat_template_path):
            raise RecipeError(f"chat_template_path: {chat_template_path}: no such file.")
        with open(chat_template_path, encoding="utf-8") as handle:
            tokenizer.chat_template, which = handle.read(), chat_template_path
    elif tokenizer.chat_template:
        which = "the tokenizer's own"
    else:
        tokenizer.chat_template, which = DEFAULT_CHAT_TEMPLATE, "the default (### Instruction / ### Response)"
    if assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        try:
            get_training_chat_template(tokenizer)  # SFTTrainer swaps in TRL's marked copy of a template it knows
        except ValueError as error:
            raise RecipeError(
                f"chat_template_path: {which} chat template has no {{% generation %}} markers, which "
                "assistant_only_loss needs; give a .jinja template with them (see DEFAULT_CHAT_TEMPLATE in "
                "sft.py) or set assistant_only_loss: false."
            ) from error
    return which


def sft_tokenizer(model_args, sft_args, training_args):
    """(tokenizer with its chat template, model config), checked against each other and seq_length before any data
    or weights are read (validate_model_and_data: seq_length within the positions, StarCoder2's tokens present)."""
    tokenizer = load_tokenizer(sft_args.tokenizer_name_or_path)
    which = set_chat_template(tokenizer, training_args.chat_template_path, training_args.assistant_only_loss)
    logger.info("chat template: %s", which)
    config = build_config(model_args, len(tokenizer))
    from_scratch = model_args.model_name_or_path is None
    validate_model_and_data(config, tokenizer, training_args.seq_length, from_scratch=from_scratch)
    return tokenizer, config


def build_sft_dataset(sft_args, tokenizer):
    """load_messages as the recipe says, no content holding one of `tokenizer`'s added tokens; the report logged
    (a warning when rows were skipped). Returns (dataset, RowReport)."""
    dataset, report = load_messages(
        sft_args.dataset_name_or_path,
        split=sft_args.dataset_split,
        messages_field=sft_args.messages_field,
        bad_rows=sft_args.bad_rows,
        max_samples=sft_args.max_samples,
        special_tokens=tokenizer.get_added_vocab(),
    )
    for line in report.summary_lines():
        (logger.warning if report.skipped else logger.info)("data: %s", line)
    return dataset, report


def sft_trainer(model_args, training_args, tokenizer, config, train_dataset, run_recipe=None) -> SFTTrainer:
    """TRL's SFTTrainer, ready to train: the model (run.py's build_model: create_model on the project's
    attention, LoRA through model/lora.py's apply_lora, whose target check refuses a wrong name), the messages
    tokenized, masked and packed by TRL as the module docstring says."""
    training_args.trust_remote_code = model_args.trust_remote_code
    attn_implementation = choose_attention(model_args.attn_implementation)
    set_seed(training_args.seed)  # the adapters' initialisation
    model = build_model(model_args, config, tokenizer, attn_implementation, training_args)
    return ProjectSFTTrainer(
        model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer, run_recipe=run_recipe
    )


def run_sft(argv=None) -> SFTTrainer:
    """scripts/run_sft.py: parse the recipe, train, save the adapter (OUTPUT_DIR/adapter for LoRA, else the model)
    with the tokenizer and its chat template, and the train metrics with the data report."""
    parser = SFTRecipeParser()
    model_args, sft_args, training_args = parser.parse(argv)
    configure_logging(training_args)
    parser.cpu_fallback.check()  # a GPU-only value asked for without CUDA: refused before any work
    if training_args.should_log:
        parser.cpu_fallback.log(logger)  # what a machine without CUDA changed (training/cpu_fallback.py)
    tokenizer, config = sft_tokenizer(model_args, sft_args, training_args)
    # As pretraining: the newest complete checkpoint of this recipe (another recipe's refused); on SIGTERM or
    # SIGUSR1 a complete checkpoint and exit 75 for the requeue.
    recipe = run_recipe(model_args, sft_args, training_args, parser.recipe_values)
    resume = resolve_resume(training_args, recipe)
    train_dataset, report = build_sft_dataset(sft_args, tokenizer)
    trainer = sft_trainer(model_args, training_args, tokenizer, config, train_dataset, run_recipe=recipe)
    preemption = PreemptionCallback().install()
    trainer.add_callback(preemption)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        preemption.uninstall()
    if preemption.requested:
        preemption.exit_for_requeue(trainer, close_process_group)
    packed = trainer.train_dataset
    tokens = pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py()  # in Arrow: no Python lists
    efficiency = tokens / (len(packed) * training_args.seq_length)  # real tokens over packed rows' room
    metrics = dict(result.metrics, **report.as_metrics(), train_tokens=tokens, packing_efficiency=efficiency)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    save_final_model(trainer, tokenizer, model_args, training_args)
    close_process_group(exit_code=0)  # a multi-process run ends here (training/distributed.py says why)
    return trainer
