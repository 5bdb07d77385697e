import datetime
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from starcoder2_train.benchmarking import data_pipeline
from starcoder2_train.benchmarking.kernels import attention_pairs, attention_words, choose_kernel
from starcoder2_train.benchmarking.paths import (
    SHARED_KEYS,
    PadToLongest,
    PlainRows,
    documents_per_batch,
    flattening_attention,
    flattening_path,
    plain_training_args,
)
from starcoder2_train.benchmarking.provenance import run_record
from starcoder2_train.configs import ModelArguments, PretrainingArguments
from starcoder2_train.model.factory import create_model
from starcoder2_train.model.presets import build_config

ROOT = Path(__file__).parents[1]
PROVENANCE = ("commit", "uncommitted_changes", "date", "command", "machine", "python", "torch", "transformers")

FIGURES = (
    "tokens_per_second_per_device",
    "real_tokens_per_second_per_device",
    "tflops_per_device_causal",
    "mfu_causal",
    "mfu_causal_at_seq_length",
    "mfu_palm",
    "hardware_tflops",
    "peak_memory_gb",
    "seconds_per_step",
)


def head_commit() -> str:
    """What `git rev-parse HEAD` says in this checkout ("unknown" where the tests run outside git)."""
    completed = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmark")


TEST_WORDS = ["--model_config", "test", "--seq_length", "128", "--per_device_train_batch_size", "2"]
TEST_WORDS += ["--attn_implementation", "sdpa_blocked", "--use_cpu", "true", "--peak_flops", "1e12"]


@pytest.mark.slow
def test_benchmark_measures_every_path_in_its_own_process_under_deepspeed(benchmark, tmp_path, capsys):
    """The parent: ours, plain and flattening each in a process of its own, through DeepSpeed ZeRO-1 on the CPU,
    plus the GEMM benchmark, the profile taken in ours' process after its timed steps; the report aggregates them
    and names its provenance."""
    output = tmp_path / "result.json"
    token_file = tmp_path / "tokens.npz"
    words = [*TEST_WORDS, "--synthetic", "40", "--max_tokens", "20000", "--steps", "2", "--warmup", "1"]
    words += ["--baselines", "plain,flattening", "--repeats", "1", "--loss_chunk_size", "64"]
    words += ["--deepspeed", str(ROOT / "accelerate_configs" / "deepspeed" / "zero1.json")]
    words += ["--profile_steps", "1", "--gemm", "--output", str(output), "--save_token_file", str(token_file)]
    report = benchmark.main(words)
    for path in ("ours", "plain", "flattening"):
        result = report["results"][path]
        assert "error" not in result, result
        for key in FIGURES:
            assert result[key] > 0, (path, key)
        assert result["deepspeed"] is True and result["repeats"] == result["finished"] == 1
        assert result["real_tokens_per_second_per_device_min"] == result["real_tokens_per_second_per_device"]
        assert result["mfu_palm"] > result["mfu_causal_at_seq_length"] > 0
    ours = report["results"]["ours"]
    assert ours["attention"] == "sdpa_blocked" and ours["loss_recomputes_logits"] is True  # chunked loss
    assert ours["hardware_tflops"] > ours["model_tflops_causal"]
    assert report["results"]["plain"]["attention"] == report["results"]["flattening"]["attention"] == "sdpa"
    ratios = report["useful_tokens_per_second_ratio"]
    assert ratios.keys() == {"plain", "flattening", "best_baseline", "vs_best_baseline"}
    assert report["path_details"]["flattening"]["documents_per_batch"] >= 1
    assert report["profile"]["profile"]["steps"] == 1 and report["gemm"]["ceiling_tflops"] > 0
    assert [p["status"] for p in report["processes"]] == ["exit 0"] * 4  # ours (profiled after), plain, flat., gemm
    written = json.loads(output.read_text())
    assert written["results"].keys() == {"ours", "plain", "flattening"}
    assert written["commit"] == head_commit() and written["date"].startswith("20")
    assert written["command"].startswith("python scripts/benchmark.py --model_config test --seq_length 128 ")
    assert written["deepspeed_config"].endswith("zero1.json")
    printed = capsys.readouterr().out
    assert "ours / best baseline" in printed and "GEMM ceiling" in printed
    assert token_file.is_file()


def test_one_path_runs_in_this_process_with_its_figures(benchmark, tmp_path):
    """A child (--only_path): each path trains its timed steps; the token file written by one feeds the next."""
    token_file = tmp_path / "tokens.npz"
    timing = ["--steps", "1", "--warmup", "1", "--synthetic", "30", "--max_tokens", "8000"]
    first = benchmark.main(
        [*TEST_WORDS, *timing, "--only_path", "ours", "--output", str(tmp_path / "a.json")]
        + ["--save_token_file", str(token_file)]
    )
    assert first["path"] == "ours" and first["context"]["path_details"]["windows"] > 0
    assert first["result"]["real_tokens_per_second_per_device"] > 0 and first["result"]["losses"]
    flattening = benchmark.main(
        [*TEST_WORDS, "--steps", "1", "--warmup", "1", "--token_file", str(token_file)]
        + ["--only_path", "flattening", "--output", str(tmp_path / "b.json"), "--config", "attention_dropout=0.0"]
    )
    assert flattening["context"]["data"]["tokens"] == first["context"]["data"]["tokens"]
    assert flattening["context"]["config_overrides"] == ["attention_dropout=0.0"]
    assert flattening["result"]["attention"] == "sdpa" and flattening["result"]["timed_steps"] == 1
    assert json.loads((tmp_path / "b.json").read_text())["result"]["final_loss"] > 0


def test_flattening_keeps_documents_apart_and_keeps_every_token(tmp_path):
    """transformers' sdpa builds a per-document mask from the flattened position_ids (no attention_mask): the
    logits of a flattened batch equal each document's alone; and every token of every piece is in a batch."""
    model_args = ModelArguments(model_config="test")
    config = build_config(model_args, 256)  # sliding window 32: documents below and above it
    documents = [np.random.default_rng(i).integers(1, 250, size=n) for i, n in enumerate((40, 7, 25, 90, 3))]
    args = PretrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=1)
    path = flattening_path(model_args, args, [], str(tmp_path), documents, seq_length=64)
    assert path.attention == "sdpa" and path.training_args.train_sampling_strategy == "random"
    assert path.training_args.loss_kernel == "transformers" and not path.training_args.compile_layers
    pieces = [len(path.dataset[i]["input_ids"]) for i in range(len(path.dataset))]
    assert pieces == [40, 7, 25, 64, 26, 3]  # the 90-token document in pieces of at most seq_length
    # 64 tokens per micro batch (seq_length x 1) at a mean piece of 27.5 tokens: 2 pieces per batch.
    assert path.details["documents_per_batch"] == 2 == path.training_args.per_device_train_batch_size

    batch = path.collator([path.dataset[i] for i in range(len(path.dataset))])
    assert "attention_mask" not in batch
    assert batch["input_ids"][0].tolist() == np.concatenate(documents).tolist()  # every token, in order
    starts = np.cumsum([0, *pieces[:-1]])
    assert (batch["labels"][0] == -100).nonzero().flatten().tolist() == starts.tolist()  # no target across pieces
    torch.manual_seed(0)
    model = create_model(model_args, config, None, "sdpa").eval()
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = torch.cat([model(input_ids=torch.as_tensor(p["input_ids"])[None]).logits[0] for p in path.dataset])
        mixed = model(input_ids=batch["input_ids"]).logits[0]  # without the positions: documents attend across
    torch.testing.assert_close(flat, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixed, alone, atol=1e-3)


def test_documents_per_batch_matches_the_tokens_of_ours():
    assert documents_per_batch([1000, 3000], 4 * 4096) == 8
    assert documents_per_batch([20000], 4096) == 1
    assert flattening_attention(cuda=False) == "sdpa"


def test_baselines_share_the_optimisation_and_engine_keys_and_run_as_transformers(tmp_path):
    ours = PretrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        learning_rate=1e-3,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        compile_layers=True,
        loss_chunk_size=64,
        seed=7,
    )
    plain = plain_training_args(ours, ["gradient_checkpointing=true", "max_grad_norm=0.5"], str(tmp_path))
    assert "deepspeed" in SHARED_KEYS and "optim" in SHARED_KEYS
    assert (plain.learning_rate, plain.per_device_train_batch_size, plain.seed) == (1e-3, 3, 7)
    assert plain.gradient_accumulation_steps == 2 and plain.max_grad_norm == 0.5 and plain.gradient_checkpointing
    assert plain.loss_kernel == "transformers" and plain.loss_chunk_size == 0 and not plain.compile_layers


def test_plain_rows_keep_every_token_and_pad_to_the_longest():
    documents = [np.arange(1, 11), np.arange(1, 4)]
    rows = PlainRows(documents, seq_length=4)
    assert [len(rows[i]["input_ids"]) for i in range(len(rows))] == [4, 4, 2, 3]
    batch = PadToLongest(pad_id=0)([rows[2], rows[1]])
    assert batch["input_ids"].tolist() == [[9, 10, 0, 0], [5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[9, 10, -100, -100], [5, 6, 7, 8]]


def test_device_check_chooses_the_fastest_correct_kernel_the_model_can_train_with():
    results = [
        {"kernel": "sdpa (transformers' packed mask)", "seq_length": 4, "forward_backward_ms": 9.0},
        {"kernel": "sdpa_varlen", "seq_length": 4, "forward_backward_ms": 2.0, "correct": True},
        {"kernel": "flex_attention", "seq_length": 4, "forward_backward_ms": 1.0, "correct": True},
        {"kernel": "sdpa_blocked", "seq_length": 4, "forward_backward_ms": 0.5, "correct": False},
    ]
    assert choose_kernel(results, model_attention_dropout=0.1) == "sdpa_varlen"
    assert choose_kernel(results, model_attention_dropout=0.0) == "flex_attention"
    assert choose_kernel(results[:1], model_attention_dropout=0.0) == "sdpa"
    # FA3 has no dropout; a kernel not installed is never chosen; with dropout, the dropout timings count.
    results += [
        {"kernel": "sdpa_varlen+fa3", "seq_length": 4, "forward_backward_ms": 0.8, "correct": True},
        {"kernel": "sdpa_varlen+fa4", "seq_length": 4, "status": "not installed (flash_attn.cute.interface)"},
    ]
    assert choose_kernel(results, model_attention_dropout=0.1) == "sdpa_varlen"
    assert choose_kernel(results, model_attention_dropout=0.0) == "sdpa_varlen+fa3"
    results[1]["dropout_forward_backward_ms"] = 12.0  # sdpa_varlen's dropout is slower than the reference's 9
    assert choose_kernel(results, model_attention_dropout=0.1) == "sdpa"
    assert attention_words("sdpa_varlen+fa3") == [
        "--attn_implementation",
        "sdpa_varlen",
        "--flash_attention_impl",
        "fa3",
    ]
    assert attention_words("sdpa") == ["--attn_implementation", "sdpa"]
    # Documents of 3 and 6 tokens, window 4: (1+2+3) + (1+2+3+4+4+4) = 24 query-key pairs.
    assert attention_pairs([3, 6], window=4) == 24


def test_run_record_names_the_commit_of_the_package_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: the commit is looked up from the package's directory
    record = run_record(["--label", "a b"], str(ROOT / "scripts" / "benchmark.py"))
    assert set(PROVENANCE) <= record.keys()
    assert record["commit"] == head_commit() != ""
    assert record["command"] == "python scripts/benchmark.py --label 'a b'"
    date = datetime.datetime.fromisoformat(record["date"])
    assert date.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - date) < datetime.timedelta(minutes=5)


def test_run_record_says_unknown_outside_git_and_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no checkout above tmp_path counts
    record = run_record([], str(tmp_path / "script.py"), directory=str(tmp_path))
    assert record["commit"] == record["uncommitted_changes"] == "unknown"
    assert record["command"] == f"python {tmp_path / 'script.py'}"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert run_record([], "script.py")["commit"] == "unknown"


def test_benchmark_data_writes_its_figures_with_provenance(tmp_path, monkeypatch, tokenizer):
    """The script's wiring and --json, on rows made here (the real first section ingests the standard library)."""
    import datasets

    rng = np.random.default_rng(0)
    lengths = (3000, 500, 9000, 40, 20000, 8000)  # 40,540 tokens: 10 windows of 4096, one batch of 8 collated
    ids = [[*rng.integers(10, 500, size=n - 1).tolist(), tokenizer.eos_token_id] for n in lengths]
    rows = datasets.Dataset.from_dict({"input_ids": ids, "num_tokens": [len(row) for row in ids]})
    rate = {"seconds": 1.0, "megabytes_per_second": 2.0, "tokens_per_second": 3.0, "time_over_raw": 1.1}
    section = {
        "repositories": len(rows),
        "tokens": sum(rows["num_tokens"]),
        "vocab_size": 600,
        "fim_rate": 0.5,
        "ingest": {"megabytes": 1.0, "seconds": 1.0, "megabytes_per_second": 1.0},
        "megabytes_read": 1.0,
        "raw_encode_batch": rate,
        "pipeline": rate,
        "pipeline_fim_off": rate,
    }
    monkeypatch.setattr(data_pipeline, "tokenization", lambda work, vocab_size: (section, rows, tokenizer))
    output = tmp_path / "figures" / "data.json"
    figures = load_script("benchmark_data").main(["--output", str(tmp_path), "--json", str(output)])
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(figures))
    assert set(PROVENANCE) <= written.keys() and written["commit"] == head_commit()
    assert written["command"] == f"python scripts/benchmark_data.py --output {tmp_path} --json {output}"
    assert written["pack_and_collate"]["tokens_per_second"] > 0
    efficiency = {entry["seq_length"]: entry for entry in written["packing_efficiency"]}
    assert efficiency.keys() == {4096, 16384}
    assert efficiency[4096]["this_project"] == pytest.approx(40540 / (10 * 4096))  # nothing dropped, 10 windows
