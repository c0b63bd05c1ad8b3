"""The latency-throughput curve of a concurrency sweep: system output tok/s against per-user output
tok/s, one line per backend, each point labelled with its concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

LOG_SCALE_SPAN = 20.0  # values spanning more than this factor (kiln vs hf) are drawn on a log axis


def plot_sweep(reports: list[dict[str, Any]], path: str | Path) -> Path:
    fig = Figure(figsize=(7.5, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    by_backend: dict[str, list[dict[str, Any]]] = {}
    for r in reports:
        by_backend.setdefault(r["engine"]["backend"], []).append(r)
    xs, ys = [], []
    for backend, runs in by_backend.items():
        runs.sort(key=lambda r: r["request_info"]["max_concurrency"] or float("inf"))
        x = [r["performance"]["output_throughput_per_user_tok_s"] for r in runs]
        y = [r["performance"]["system_output_throughput_tok_s"] for r in runs]
        ax.plot(x, y, marker="o", label=backend)
        for xi, yi, r in zip(x, y, runs):
            ax.annotate(str(r["request_info"]["max_concurrency"] or "all"), (xi, yi), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        xs += x
        ys += y
    for values, set_scale, axis in ((xs, ax.set_xscale, ax.xaxis), (ys, ax.set_yscale, ax.yaxis)):
        if max(values) > LOG_SCALE_SPAN * min(values):
            set_scale("log")
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(NullFormatter())
    first = reports[0]
    d = first["dataset"]
    ax.set_title(f"{first['engine']['model']}, {first['engine']['dtype']}, ISL/OSL {d['avg_isl']}/{d['avg_osl']}, "
                 f"{first['machine']['name']}", fontsize=9)
    ax.set_xlabel("per-user output throughput (tok/s/user)")
    ax.set_ylabel("system output throughput (tok/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="backend (point: concurrency)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
