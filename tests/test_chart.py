"""The per-language chart of an evaluation: bars from `metric/<language>` entries with their counts."""

from starcoder2_train.evaluation.chart import draw_language_chart, per_language

RESULTS = {
    "loss": {"loss": 2.5, "loss/Python": 2.0, "loss/Rust": 3.1, "tokens/Python": 900, "tokens/Rust": 40,
             "perplexity/Python": 7.4},
    "fim": {"exact_match": 0.25, "exact_match/Python": 0.5, "problems/Python": 4, "exact_match/Rust": 0.0,
            "problems/Rust": 4},
    "humaneval": {"pass@1": 0.1},
}  # fmt: skip


def test_bars_are_the_per_language_entries_with_their_counts():
    assert per_language(RESULTS["loss"], "loss", "tokens") == [("Python", 2.0, 900), ("Rust", 3.1, 40)]
    assert per_language(RESULTS["fim"], "exact_match", "problems") == [("Python", 0.5, 4), ("Rust", 0.0, 4)]
    assert per_language(RESULTS["humaneval"], "loss", "tokens") == []


def test_the_chart_is_written_for_per_language_results_only(tmp_path):
    assert draw_language_chart({"humaneval": {"pass@1": 0.1}}, str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()
    path = draw_language_chart(RESULTS, str(tmp_path / "results.png"), title="model")
    assert open(path, "rb").read().startswith(b"\x89PNG") and sorted(p.name for p in tmp_path.iterdir()) == [
        "results.png"
    ]
