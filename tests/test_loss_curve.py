"""The loss curve PNG: points taken from the Trainer's log history at tokens seen, drawn whole, redrawn as the
history grows, nothing drawn before there is a loss."""

from starcoder2_train.training.loss_curve import LOSS_CURVE, LossCurveCallback, curves, draw_loss_curve

HISTORY = [
    {"loss": 8.0, "learning_rate": 1e-4, "step": 10},
    {"loss": 6.5, "learning_rate": 2e-4, "step": 20},
    {"eval_loss": 6.9, "step": 20},
    {"train_runtime": 3.0, "step": 20},  # the Trainer's summary entry: no point
    {"loss": 5.0, "learning_rate": 1.5e-4, "step": 30},
]


def test_points_are_at_the_tokens_seen():
    points = curves(HISTORY, tokens_per_step=4096)
    assert points["train"] == [(40960, 8.0), (81920, 6.5), (122880, 5.0)]
    assert points["eval"] == [(81920, 6.9)]
    assert [rate for _, rate in points["learning_rate"]] == [1e-4, 2e-4, 1.5e-4]


def test_the_png_is_written_whole_and_redrawn(tmp_path):
    path = str(tmp_path / LOSS_CURVE)
    assert draw_loss_curve([{"learning_rate": 1e-4, "step": 1}], 10, path) is None
    assert draw_loss_curve(HISTORY[:2], 10, path) == path
    with open(path, "rb") as handle:
        first = handle.read()
    assert first.startswith(b"\x89PNG") and len(first) > 5000
    draw_loss_curve(HISTORY, 10, path, title="test")
    with open(path, "rb") as handle:
        assert handle.read() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOSS_CURVE]  # no partial file left


def test_the_callback_draws_on_rank_zero_only(tmp_path):
    from types import SimpleNamespace

    callback = LossCurveCallback(tokens_per_step=64)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"))
    callback.on_evaluate(args, SimpleNamespace(is_world_process_zero=False, log_history=HISTORY), None)
    assert callback.path is None and not (tmp_path / "out").exists()
    callback.on_train_end(args, SimpleNamespace(is_world_process_zero=True, log_history=HISTORY), None)
    assert callback.path == str(tmp_path / "out" / LOSS_CURVE)
