"""Write a matplotlib figure as a PNG or as one self-contained HTML page (the PNG inline),
for every ``--plot`` option: reports people would rather look at than read."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from memtrain.errors import MemtrainError, check_output_path


def plot_path(path: str | Path) -> Path:
    """The ``--plot`` target, refused with a clear error unless it is a .png/.html file in an
    existing folder (checked before any work is done)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".html"):
        raise MemtrainError(f"--plot writes .png or .html files, not {path.name!r}")
    return check_output_path(path, "--plot")


def save_figure(fig, path: str | Path, title: str, extra_html: str = "") -> Path:
    """Save ``fig`` to ``path`` (.png, or .html with ``title`` and ``extra_html``); closes it."""
    import matplotlib.pyplot as plt

    path = plot_path(path)
    try:
        if path.suffix.lower() == ".png":
            fig.savefig(path, dpi=120)
        else:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=120)
            encoded = base64.b64encode(buffer.getvalue()).decode()
            path.write_text(
                f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>{title}</h1>"
                f"<img alt='{title}' src='data:image/png;base64,{encoded}'>{extra_html}"
            )
    finally:
        plt.close(fig)
    return path
