import json

import numpy as np
import pytest
from conftest import load_script

FIGURES = (
    "tokens_per_second_per_device",
    "real_tokens_per_second_per_device",
    "tflops_per_device_causal",
    "mfu_causal",
    "peak_memory_gb",
    "seconds_per_step",
)


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
    assert json.loads(output.read_text())["results"].keys() == {"ours", "plain"}
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


def test_plain_rows_keep_every_token_and_pad_to_the_longest(benchmark):
    documents = [np.arange(1, 11), np.arange(1, 4)]
    rows = benchmark.PlainRows(documents, seq_length=4)
    assert [len(rows[i]["input_ids"]) for i in range(len(rows))] == [4, 4, 2, 3]
    batch = benchmark.PadToLongest(pad_id=0)([rows[2], rows[1]])
    assert batch["input_ids"].tolist() == [[9, 10, 0, 0], [5, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[9, 10, -100, -100], [5, 6, 7, 8]]


def test_device_check_chooses_the_fastest_correct_kernel_the_model_can_train_with():
    device_check = load_script("device_check")
    results = [
        {"kernel": "sdpa (transformers' packed mask)", "seq_length": 4, "forward_backward_ms": 9.0},
        {"kernel": "sdpa_varlen", "seq_length": 4, "forward_backward_ms": 2.0, "correct": True},
        {"kernel": "flex_attention", "seq_length": 4, "forward_backward_ms": 1.0, "correct": True},
        {"kernel": "sdpa_blocked", "seq_length": 4, "forward_backward_ms": 0.5, "correct": False},
    ]
    assert device_check.choose_kernel(results, model_attention_dropout=0.1) == "sdpa_varlen"
    assert device_check.choose_kernel(results, model_attention_dropout=0.0) == "flex_attention"
    assert device_check.choose_kernel(results[:1], model_attention_dropout=0.0) == "sdpa"
    # Documents of 3 and 6 tokens, window 4: (1+2+3) + (1+2+3+4+4+4) = 24 query-key pairs.
    assert device_check.attention_pairs([3, 6], window=4) == 24


@pytest.mark.slow
def test_device_check_rehearses_on_the_cpu(tmp_path):
    device_check = load_script("device_check")
    summary = device_check.main(["--tiny", "--output_dir", str(tmp_path), "--steps", "1"])
    assert summary["chosen_attention"] in ("sdpa", "sdpa_blocked")
    cases = {step["label"]: step for step in summary["steps"]}
    for case in ("4k", "16k"):
        for path in ("ours", "plain"):
            assert cases[case]["results"][path]["real_tokens_per_second_per_device"] > 0, (case, path)
    assert (tmp_path / "device_check.json").is_file() and (tmp_path / "attention_kernels.json").is_file()
