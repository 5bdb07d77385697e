"""Progress bars: on for a terminal, off for a log file or with disable, forced either way by the environment;
the FIM evaluation shows one with its rate when asked."""

import io

import pytest

from starcoder2_train.progress import FORCE_ENV, progress, progress_disabled


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_follow_the_terminal_unless_told(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_disabled() is True  # a log file: quiet, as the Trainer is
    monkeypatch.setattr("sys.stderr", Terminal())
    assert progress_disabled() is False and progress_disabled(True) is True
    monkeypatch.setenv(FORCE_ENV, "0")
    assert progress_disabled() is True
    monkeypatch.setenv(FORCE_ENV, "1")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress_disabled() is False and progress_disabled(True) is True


def test_a_bar_reports_rate_and_eta(monkeypatch):
    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv(FORCE_ENV, raising=False)
    assert list(progress(range(5), desc="work", unit="file")) == list(range(5))
    text = stream.getvalue()
    assert "work" in text and "5/5" in text and "file/s" in text


@pytest.mark.parametrize("forced, shown", [("1", True), ("0", False)])
def test_the_fim_evaluation_shows_its_bar(forced, shown, tokenizer, monkeypatch, capsys):
    from test_fim_eval import FILES, tiny_model

    from starcoder2_train.evaluation.fim import build_fim_problems, evaluate_fim

    monkeypatch.setenv(FORCE_ENV, forced)
    evaluate_fim(tiny_model(tokenizer), tokenizer, build_fim_problems(FILES, seed=0), max_new_tokens=2, batch_size=2)
    assert ("FIM infills" in capsys.readouterr().err) == shown


@pytest.mark.parametrize("words, shown", [([], True), (["--disable_tqdm"], False)])
def test_ingest_shows_its_bar_unless_disabled(words, shown, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import LAUNCH_ENV

    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "main.py").write_text("def main():\n    return 1\n")
    command = [sys.executable, "scripts/ingest.py", str(tmp_path / "alpha"), str(tmp_path / "beta")]
    command += ["--output", str(tmp_path / "shards"), *words]
    result = subprocess.run(
        command, cwd=Path(__file__).parents[1], env=dict(LAUNCH_ENV, **{FORCE_ENV: "1"}), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("ingest: 100%" in result.stderr and "2/2" in result.stderr) == shown, result.stderr[-2000:]
