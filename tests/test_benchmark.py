import datetime
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from starcoder2_train.benchmarking import data_pipeline
from starcoder2_train.benchmarking.kernels import attention_pairs, choose_kernel, read_kernels
from starcoder2_train.benchmarking.paths import PadToLongest, PlainRows
from starcoder2_train.benchmarking.provenance import run_record

ROOT = Path(__file__).parents[1]
PROVENANCE = ("commit", "uncommitted_changes", "date", "command", "machine", "python", "torch", "transformers")

FIGURES = (
    "tokens_per_second_per_device",
    "real_tokens_per_second_per_device",
    "tflops_per_device_causal",
    "mfu_causal",
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


def test_benchmark_measures_both_paths_on_the_cpu(benchmark, tmp_path, capsys):
    output = tmp_path / "result.json"
    token_file = tmp_path / "tokens.npz"
    report = benchmark.main(
        [
            "--model_config",
            "test",
            "--seq_length",
            "128",
            "--per_device_train_batch_size",
            "2",
            "--synthetic",
            "40",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--baseline",
            "--attn_implementation",
            "sdpa_blocked",
            "--loss_chunk_size",
            "64",
            "--peak_flops",
            "1e12",
            "--use_cpu",
            "true",
            "--output",
            str(output),
            "--save_token_file",
            str(token_file),
            "--max_tokens",
            "20000",
        ]
    )
    for path in ("ours", "plain"):
        result = report["results"][path]
        assert "error" not in result, result
        for key in FIGURES:
            assert result[key] > 0, (path, key)
        assert 0 <= result["data_wait_share"] <= 1
        assert result["real_tokens_per_second_per_device"] <= result["tokens_per_second_per_device"]
    assert report["results"]["ours"]["attention"] == "sdpa_blocked"
    assert report["results"]["plain"]["attention"] == "sdpa"
    assert report["useful_tokens_per_second_ratio"] > 0
    written = json.loads(output.read_text())
    assert written["results"].keys() == {"ours", "plain"}
    assert written["commit"] == head_commit() and written["date"].startswith("20")
    assert written["command"].startswith("python scripts/benchmark.py --model_config test --seq_length 128 ")
    assert written["command"].endswith("--max_tokens 20000")
    printed = capsys.readouterr().out
    assert "useful tokens/s, ours / plain" in printed.splitlines()[-1]

    # The token file written above feeds a run that needs neither the datasets library nor a tokenizer.
    again = benchmark.main(
        [
            "--model_config",
            "test",
            "--seq_length",
            "128",
            "--token_file",
            str(token_file),
            "--steps",
            "1",
            "--warmup",
            "1",
            "--use_cpu",
            "true",
            "--output",
            str(tmp_path / "b.json"),
        ]
    )
    assert again["data"]["tokens"] == report["data"]["tokens"]
    assert again["results"]["ours"]["real_tokens_per_second_per_device"] > 0


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


def test_device_check_kernels_write_an_object_with_provenance(tmp_path):
    device_check = load_script("device_check")
    device_check.main(["--kernels_only", "--tiny", "--output_dir", str(tmp_path)])
    written = json.loads((tmp_path / "attention_kernels.json").read_text())
    assert written["commit"] == head_commit() and written["date"].startswith("20")
    assert written["command"] == f"python scripts/device_check.py --kernels_only --tiny --output_dir {tmp_path}"
    kernels = read_kernels(str(tmp_path / "attention_kernels.json"))
    assert kernels == written["kernels"]
    assert {(entry["kernel"], entry["seq_length"]) for entry in kernels} == {
        (kernel, length) for kernel in ("sdpa (transformers' packed mask)", "sdpa_blocked") for length in (1024, 2048)
    }
    assert all("error" not in entry for entry in kernels), kernels
    assert next(entry for entry in kernels if entry["kernel"] == "sdpa_blocked")["correct"]
    assert choose_kernel(kernels, model_attention_dropout=0.0) in ("sdpa", "sdpa_blocked")
    assert read_kernels(str(tmp_path / "missing.json")) == []


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


@pytest.mark.slow
def test_device_check_rehearses_on_the_cpu(tmp_path):
    device_check = load_script("device_check")
    summary = device_check.main(["--tiny", "--output_dir", str(tmp_path), "--steps", "1"])
    assert summary["chosen_attention"] in ("sdpa", "sdpa_blocked")
    cases = {step["label"]: step for step in summary["steps"]}
    for case in ("4k", "16k"):
        for path in ("ours", "plain"):
            assert cases[case]["results"][path]["real_tokens_per_second_per_device"] > 0, (case, path)
    written = json.loads((tmp_path / "device_check.json").read_text())
    assert written["commit"] == head_commit() and written["date"].startswith("20")
    assert written["command"].startswith("python scripts/device_check.py --tiny")
    assert written["attention_kernels"] == read_kernels(str(tmp_path / "attention_kernels.json"))
