"""Small matplotlib helpers that write PNGs atomically (headless: the Agg backend, no display needed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fakegpt.files import atomic_path


@contextlib.contextmanager
def figure(path: str | Path, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`with figure(path, figsize=...) as (fig, ax):` draw; on success the PNG is written atomically to `path`.

    The figure is closed either way (pyplot keeps every open figure alive otherwise).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(**subplots)
    try:
        yield fig, ax
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def line_plot(
    path: str | Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    markers: Sequence[str] = (),
) -> Path:
    """Plot named (x, y) series as lines into a PNG at `path`. Series named in `markers` also get dots."""
    with figure(path, figsize=(7, 4.2), dpi=110) as (_, ax):
        for name, points in series.items():
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                ys,
                label=name,
                marker="o" if name in markers else None,
                markersize=3,
                linewidth=1.0 if name not in markers else 1.5,
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return Path(path)
