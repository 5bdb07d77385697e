"""Instruction SFT with LoRA through TRL's SFTTrainer (sft.py) on a tiny random StarCoder2: the loss sees the
assistant turns only, packed samples do not attend to each other and lose no token, a short run through
scripts/run_sft.py trains and saves only the adapter with the chat template, bad rows are refused or counted by
row, and a wrong LoRA target is refused."""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_ENV, SNIPPETS, random_code
from safetensors import safe_open
from transformers import AutoTokenizer

from starcoder2_train.configs import ModelArguments, RecipeError
from starcoder2_train.data.batches.collators import document_boundaries
from starcoder2_train.data.special_tokens import IGNORE_INDEX
from starcoder2_train.model.factory import create_model
from starcoder2_train.sft import (
    DEFAULT_CHAT_TEMPLATE,
    SFTArguments,
    SFTRecipeParser,
    SFTTrainingArguments,
    build_sft_dataset,
    load_messages,
    run_sft,
    set_chat_template,
    sft_tokenizer,
    sft_trainer,
)
from starcoder2_train.training.checkpoints import newest_complete_checkpoint, verify_checkpoint

ROOT = Path(__file__).parents[1]
SCRIPT = str(ROOT / "scripts" / "run_sft.py")
EOS = "<|endoftext|>"


def conversation(index: int, rng: random.Random, turns: int | None = None) -> dict:
    """A messages row: a system prompt every other row, then 1-3 user/assistant turns of code."""
    messages = [{"role": "system", "content": f"You write code for task {index}."}] if index % 2 == 0 else []
    for turn in range(turns or 1 + index % 3):
        messages.append({"role": "user", "content": f"Write part {turn} of program {index}, please."})
        messages.append({"role": "assistant", "content": random_code(rng, 1, 3)})
    return {"messages": messages}


def conversations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [conversation(i, rng) for i in range(count)]
    # Responses opening with indentation, a newline, or a digit, and a long one that must be cut into pieces.
    rows.append({"messages": [{"role": "user", "content": "indent"}, {"role": "assistant", "content": "    x = 1\n"}]})
    rows.append({"messages": [{"role": "user", "content": "newline"}, {"role": "assistant", "content": "\nprint(2)"}]})
    rows.append({"messages": [{"role": "user", "content": "digit"}, {"role": "assistant", "content": "42"}]})
    rows.append(conversation(count, rng, turns=6))
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random StarCoder2 checkpoint with the conftest tokenizer (no chat template), saved as a base to tune."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = create_model(ModelArguments(model_config="test", torch_dtype="float32"), tokenizer=tokenizer)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_trainer(tmp_path, base_dir, rows, seq_length, attn_implementation="auto"):
    """The notebook path: sft_tokenizer → build_sft_dataset → sft_trainer, LoRA r=8 on the tiny base."""
    model_args = ModelArguments(
        model_name_or_path=base_dir, torch_dtype="float32", attn_implementation=attn_implementation, use_lora=True,
        lora_r=8, lora_alpha=16,
    )  # fmt: skip
    sft_args = SFTArguments(
        dataset_name_or_path=write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer_name_or_path=base_dir
    )
    training_args = SFTTrainingArguments(
        output_dir=str(tmp_path / "out"), seq_length=seq_length, per_device_train_batch_size=2, report_to="none"
    )
    tokenizer, config = sft_tokenizer(model_args, sft_args, training_args)
    dataset, _ = build_sft_dataset(sft_args, tokenizer)
    return sft_trainer(model_args, training_args, tokenizer, config, dataset)


def samples(packed_row: dict):
    """The samples of a packed row: (input_ids, labels) per entry of its seq_lengths."""
    begin = 0
    for length in packed_row["seq_lengths"]:
        yield packed_row["input_ids"][begin : begin + length], packed_row["labels"][begin : begin + length]
        begin += length


def labelled_spans(input_ids, labels) -> list[list[int]]:
    """The runs of consecutive tokens that are targets (label != -100)."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


def test_loss_on_assistant_turns_only(tmp_path, base_dir):
    rows = conversations(24)
    trainer = make_trainer(tmp_path, base_dir, rows, seq_length=1024)
    tokenizer = trainer.processing_class
    by_text = {tokenizer.apply_chat_template(row["messages"], tokenize=False): row for row in rows}
    matched = 0
    for packed_row in trainer.train_dataset:
        for input_ids, labels in samples(packed_row):
            row = by_text[tokenizer.decode(input_ids)]  # seq_length holds every sample whole: none was cut
            spans = [tokenizer.decode(span) for span in labelled_spans(input_ids, labels)]
            # The response span: the newline after "### Response", the content, the end token (sft.py).
            assert spans == ["\n" + m["content"] + EOS for m in row["messages"] if m["role"] == "assistant"]
            matched += 1
    assert matched == len(rows)
    assert any(m["role"] == "system" for row in rows for m in row["messages"])


@pytest.mark.parametrize("attn_implementation", ["sdpa_blocked", "sdpa_varlen"])
def test_packing_isolates_samples_and_drops_nothing(tmp_path, base_dir, attn_implementation):
    rows = conversations(16, seed=1)
    seq_length = 160
    trainer = make_trainer(tmp_path, base_dir, rows, seq_length, attn_implementation)
    tokenizer, packed = trainer.processing_class, trainer.train_dataset
    rendered = [
        tokenizer.apply_chat_template(row["messages"], return_dict=True, return_assistant_tokens_mask=True)
        for row in rows
    ]
    assert max(len(r["input_ids"]) for r in rendered) > seq_length  # the long row was cut into pieces

    # No token dropped: the packed rows hold exactly the tokens of the rendered conversations, and the targets.
    expected = Counter(token for r in rendered for token in r["input_ids"])
    assert Counter(token for ids in packed["input_ids"] for token in ids) == expected
    assert sum(map(len, packed["input_ids"])) == sum(len(r["input_ids"]) for r in rendered)
    targets = sum(sum(r["assistant_masks"]) for r in rendered)
    assert sum(label != IGNORE_INDEX for labels in packed["labels"] for label in labels) == targets

    # TRL's padding-free batch is this project's packed format: one flattened row, positions restarting per sample,
    # the first label of each sample ignored, and the document boundaries data/batches/collators.py computes.
    # A piece of the cut sample (rows go longest first), and the two rows holding the most samples.
    chosen = [0] + sorted(range(len(packed)), key=lambda i: -len(packed[i]["seq_lengths"]))[:2]
    batch = trainer.data_collator([packed[i] for i in chosen])
    assert batch["input_ids"][0].tolist() == [t for i in chosen for t in packed[i]["input_ids"]]
    project = document_boundaries(batch["position_ids"])
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        assert torch.equal(torch.as_tensor(batch[key]), torch.as_tensor(project[key])), key
    assert (batch["labels"][batch["position_ids"] == 0] == IGNORE_INDEX).all()

    # Samples do not attend to each other: the packed logits equal each sample's logits alone, in training (the
    # decoder's packed-marker hook) and in evaluation (the mask function); the test model has no dropout, and the
    # adapters start at zero.
    model = trainer.model
    assert model.config._attn_implementation == attn_implementation
    bounds = batch["cu_seq_lens_q"].tolist()
    assert len(bounds) > 5  # five samples or more
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
            for begin, end in zip(bounds[:-1], bounds[1:]):
                alone = model(input_ids=batch["input_ids"][:, begin:end]).logits[0]
                assert (logits[begin:end] - alone).abs().max().item() <= 1e-5, (training, begin, end)


def test_run_sft_script_trains_only_the_adapter(tmp_path, base_dir):
    # A task the tiny random model can learn in 30 steps of LoRA: the same answer to every instruction.
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Add two numbers ({i})."},
                {"role": "assistant", "content": SNIPPETS[0]},
            ]
        }
        for i in range(40)
    ]
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]}
    data = write_jsonl(tmp_path / "sft.jsonl", rows[:5] + [bad] + rows[5:])  # the bad row is line 6
    output_dir = tmp_path / "run"
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        f"model_name_or_path: {base_dir}\ntorch_dtype: float32\nuse_lora: true\nlora_r: 8\nlora_alpha: 16\n"
        f"dataset_name_or_path: {data}\nbad_rows: skip\nseq_length: 128\noutput_dir: {output_dir}\nmax_steps: 30\n"
        "per_device_train_batch_size: 2\nlearning_rate: 0.01\nlr_scheduler_type: constant\nlogging_steps: 1\n"
        "save_strategy: steps\nsave_steps: 15\nreport_to: none\nseed: 0\n"
    )
    result = subprocess.run(
        [sys.executable, SCRIPT, str(recipe), "--warmup_steps", "0"],
        capture_output=True, text=True, env=LAUNCH_ENV, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "unknown role" in result.stdout and f"{data}:6" in result.stdout  # skipped, counted, named

    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses  # measured: 5.87 → 5.20 nats
    metrics = json.loads((output_dir / "train_results.json").read_text())
    assert (metrics["sft_rows"], metrics["sft_rows_skipped"]) == (len(rows), 1)
    assert 0.5 < metrics["packing_efficiency"] <= 1.0 and metrics["train_tokens"] > len(rows) * 20

    adapter_dir = output_dir / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(adapter_dir))
    # The project's checkpoints: staged, verified, marked complete (checkpoint_complete.json), with the recipe.
    assert newest_complete_checkpoint(str(output_dir)) == (str(output_dir / "checkpoint-30"), [])
    for step in (15, 30):
        assert verify_checkpoint(str(output_dir / f"checkpoint-{step}")) == []
        assert (output_dir / f"checkpoint-{step}" / "run_recipe.json").exists()
    weights = [p.relative_to(output_dir) for p in output_dir.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
    weights = sorted(str(path) for path in weights if path.suffix == ".safetensors")
    assert weights == [  # no base weights anywhere: the adapter, and the adapter in each checkpoint
        "adapter/adapter_model.safetensors",
        "checkpoint-15/adapter_model.safetensors",
        "checkpoint-30/adapter_model.safetensors",
    ], weights
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as saved:
        assert saved.keys() and all("lora_" in key for key in saved.keys())

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(rows[0]["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{EOS}### Instruction\nAdd two numbers (0).\n\n### Response"


BAD_ROWS = [  # (line, reason) in the file bad_rows_file writes
    (2, "invalid JSON"),
    (3, "no messages"),
    (4, "unknown role"),
    (5, "no assistant turn"),
    (6, "non-string content"),
    (7, "content holds special-token text"),
    (8, "message without role and content"),
]


@pytest.fixture
def bad_rows_file(tmp_path):
    good = conversations(3)
    lines = [
        good[0],
        '{"messages": [',
        {"text": "no messages here"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
        {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": f"x{EOS}y"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
        good[1],
        "",
        good[2],
    ]
    return write_jsonl(tmp_path / "bad.jsonl", lines)


def test_bad_rows_refused_with_the_row_named(bad_rows_file):
    with pytest.raises(RecipeError) as error:
        load_messages(bad_rows_file)
    message = str(error.value)
    assert "7 bad row(s)" in message and "bad_rows: skip" in message
    for line, reason in BAD_ROWS[:5]:  # the first five are named
        assert f"{bad_rows_file}:{line}: {reason}" in message


def test_bad_rows_skipped_and_counted(bad_rows_file, tmp_path):
    dataset, report = load_messages(bad_rows_file, bad_rows="skip")
    assert len(dataset) == report.kept == 3
    assert report.skipped == Counter(reason for _, reason in BAD_ROWS)
    assert report.first_seen == {reason: f"{bad_rows_file}:{line}" for line, reason in BAD_ROWS}
    lines = report.summary_lines()
    assert lines[0] == f"{bad_rows_file}: kept 3 rows, skipped 7"
    assert f"skipped 1: unknown role (first: {bad_rows_file}:4)" in lines
    # A directory of JSONL files reads every file in name order; max_samples stops at N good rows.
    folder = tmp_path / "folder"
    folder.mkdir()
    first, second = conversations(2), conversations(4, seed=5)
    write_jsonl(folder / "a.jsonl", first)
    write_jsonl(folder / "b.jsonl", second)
    assert load_messages(str(folder))[0]["messages"] == [row["messages"] for row in first + second]
    assert len(load_messages(str(folder), max_samples=3)[0]) == 3


def test_script_refuses_bad_rows_without_traceback(tmp_path, base_dir, bad_rows_file):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--model_name_or_path", base_dir, "--dataset_name_or_path", bad_rows_file,
         "--seq_length", "256", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=LAUNCH_ENV, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.startswith("error: dataset_name_or_path: 7 bad row(s)"), result.stderr[-2000:]
    assert f"{bad_rows_file}:4: unknown role" in result.stderr and "Traceback" not in result.stderr


def test_wrong_lora_target_refused(tmp_path, base_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", conversations(4))
    argv = ["--model_name_or_path", base_dir, "--use_lora", "true", "--lora_target_modules", "q_proj", "gate_proj",
            "--dataset_name_or_path", data, "--seq_length", "256", "--output_dir", str(tmp_path / "out"),
            "--report_to", "none"]  # fmt: skip
    with pytest.raises(RecipeError, match="lora_target_modules: gate_proj match"):
        run_sft(argv)


def test_recipe_parses_and_refusals():
    model_args, sft_args, training_args = SFTRecipeParser().parse(
        [str(ROOT / "recipes" / "starcoder2-3b" / "sft_lora.yaml"), "--bf16", "false"]  # bf16 needs a GPU
    )
    assert model_args.model_name_or_path == "bigcode/starcoder2-3b" and model_args.use_lora
    assert sft_args.tokenizer_name_or_path == "bigcode/starcoder2-3b"
    assert (training_args.seq_length, training_args.max_length) == (4096, 4096)
    assert (
        training_args.packing and training_args.packing_strategy == "bfd_split" and training_args.assistant_only_loss
    )
    base = ["--model_config", "test", "--dataset_name_or_path", "x.jsonl", "--output_dir", "out"]
    for words, key in (
        (["--packing_strategy", "bfd"], "packing_strategy"),
        (["--packing_strategy", "wrapped"], "packing_strategy"),
        (["--packing", "false"], "packing"),
        (["--max_length", "512"], "max_length"),  # seq_length is the one key
        (["--chat_template_path", "bigcode/starcoder2-15b-instruct-v0.1"], "chat_template_path"),
        (["--bad_rows", "ignore"], "bad_rows"),
    ):
        with pytest.raises(RecipeError, match=key):
            SFTRecipeParser().parse(base + words)


def test_chat_template_choice(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.chat_template is None  # as StarCoder2's base tokenizer
    assert set_chat_template(tokenizer).startswith("the default")
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert set_chat_template(tokenizer) == "the tokenizer's own"  # kept once it has one
    unmarked = tmp_path / "plain.jinja"
    unmarked.write_text("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    with pytest.raises(RecipeError, match="no {% generation %} markers"):
        set_chat_template(tokenizer, str(unmarked))
    assert set_chat_template(tokenizer, str(unmarked), assistant_only_loss=False) == str(unmarked)
