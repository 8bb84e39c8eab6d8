"""Plots of benchmark reports (PNG, matplotlib): step latencies, end to end per mode, a server's load.

checkpoint ──builder──▶ engine dir ──runtime──▶ serving ──[bench: plots]

Every plot is dated (the report's date, in the title). Batch sizes and concurrency levels are
integers on a log-2 axis, ticked at the levels that were measured.
"""

from __future__ import annotations

from pathlib import Path


def _levels_axis(ax, levels: list[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(level) for level in levels])
    ax.minorticks_off()
    ax.set_xlabel(label)


def _steps(ax, rows: list[dict]) -> None:
    for kind in dict.fromkeys(r["kind"] for r in rows):
        pts = [(r["batch"], r["ms"]) for r in rows if r["kind"] == kind]
        ax.plot(*zip(*pts), marker="o", label=kind)
    _levels_axis(ax, sorted({r["batch"] for r in rows}), "batch size")
    ax.set(ylabel="forward latency (ms)", title="step latency")


def _end_to_end(ax, rows: list[dict]) -> None:
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = [(r["concurrency"], r["tokens_per_s"]) for r in rows if r["mode"] == mode]
        tpf = [r["tokens_per_forward"] for r in rows if r["mode"] == mode][0]
        ax.plot(*zip(*pts), marker="o", label=f"{mode} ({tpf:.2f} tok/fwd)")
    _levels_axis(ax, sorted({r["concurrency"] for r in rows}), "concurrent requests")
    ax.set(ylabel="output tokens/s", title="end to end")


def _server(axes, rows: list[dict]) -> None:
    levels = [r["concurrency"] for r in rows]
    axes[0].plot(levels, [r["tokens_per_s"] or 0 for r in rows], marker="o", label="output tokens/s")
    axes[0].set(ylabel="output tokens/s", title="throughput")
    for key, label in (("p50", "TTFT p50"), ("p99", "TTFT p99")):
        axes[1].plot(levels, [r["ttft_ms"][key] or 0 for r in rows], marker="o", label=label)
    axes[1].set(ylabel="time to first token (ms)", title="latency")
    for ax in axes:
        _levels_axis(ax, levels, "concurrent clients")


def plot_report(report: dict, path: Path) -> bool:
    """Draw what the report holds into `path`; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [p for p in ("steps", "end_to_end") if report.get(p)]
    count = 2 if report.get("levels") else len(panels)
    fig, axes = plt.subplots(1, max(count, 1), figsize=(6 * max(count, 1), 4.2), squeeze=False)
    if report.get("levels"):
        _server(axes[0], report["levels"])
    for ax, panel in zip(axes[0], panels):
        (_steps if panel == "steps" else _end_to_end)(ax, report[panel])
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.get('title', '')} — measured {report.get('date', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)
    return True
