"""The per-language picture of an evaluation: held-out loss and FIM exact match per language as bar charts, one
PNG next to scripts/evaluate.py's JSON (`RESULTS.json` → `RESULTS.png`).

Drawn with matplotlib's object API on its Agg canvas (no pyplot state, no display). The overall figure of each task
is the dashed line across its bars; the number of files or problems behind each bar is written on it, so that a
bar of 2 problems is not read as a bar of 200.
"""

import os

TASK_PANELS = (  # (task, metric prefix, count prefix, axis label)
    ("loss", "loss", "tokens", "held-out loss (nats per token)"),
    ("fim", "exact_match", "problems", "FIM exact match"),
)


def per_language(metrics: dict, metric: str, count: str) -> list[tuple[str, float, int | None]]:
    """(language, value, count) for every `metric/<language>` entry of a task's metrics, sorted by language."""
    rows = []
    for key, value in metrics.items():
        if key.startswith(f"{metric}/") and key.count("/") == 1:
            language = key.split("/", 1)[1]
            rows.append((language, float(value), metrics.get(f"{count}/{language}")))
    return sorted(rows)


def draw_language_chart(results: dict, path: str, title: str = "") -> str | None:
    """Write the chart of the loss and fim results to `path` (None when neither has a per-language figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        (task, label, rows, results[task].get(metric))
        for task, metric, count, label in TASK_PANELS
        if task in results and (rows := per_language(results[task], metric, count))
    ]
    if not panels:
        return None
    figure = Figure(figsize=(7, 2.5 + 0.3 * max(len(rows) for _, _, rows, _ in panels) * len(panels)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for axis, (task, label, rows, overall) in zip(axes, panels):
        languages, values, counts = zip(*rows)
        bars = axis.barh(languages, values, color="tab:blue" if task == "loss" else "tab:green")
        axis.bar_label(
            bars, labels=[f"{v:.3g} (n={c})" if c is not None else f"{v:.3g}" for v, c in zip(values, counts)]
        )
        if overall is not None:
            axis.axvline(
                float(overall), color="black", linestyle="--", linewidth=1, label=f"all: {float(overall):.3g}"
            )
            axis.legend(loc="lower right")
        axis.set_xlabel(label)
        axis.invert_yaxis()
        axis.margins(x=0.25)
    if title:
        axes[0].set_title(title)
    figure.tight_layout()
    partial = f"{path}.partial.png"
    figure.savefig(partial, dpi=110)
    os.replace(partial, path)
    return path
