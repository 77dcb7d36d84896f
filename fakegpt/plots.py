"""Small matplotlib helpers that write PNGs atomically (headless: the Agg backend, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fakegpt.io import atomic_path


def line_plot(
    path: str | Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    markers: Sequence[str] = (),
) -> Path:
    """Plot named (x, y) series as lines into a PNG at `path`. Series named in `markers` also get dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        for name, points in series.items():
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name, marker="o" if name in markers else None, markersize=3,
                    linewidth=1.0 if name not in markers else 1.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
