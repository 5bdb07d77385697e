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
