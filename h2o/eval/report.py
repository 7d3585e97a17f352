"""Results out: the prototype's table, CSV, JSON and PNG plots, written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import tempfile
from pathlib import Path

import torch
import transformers

from h2o.files import atomic_path

MIB = 1 << 20


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create the output directory and prove it is writable before any heavy work."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"output directory {out} is not writable: {err}") from err
    return out


def _atomic_write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, payload: dict) -> Path:
    """JSON with NaN written as null (json.dumps would write the invalid token NaN)."""
    _atomic_write(path, json.dumps(_nan_to_none(payload), indent=2, allow_nan=False, default=_jsonable) + "\n")
    return path


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _jsonable(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(path, buffer.getvalue())
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed): the one place that picks it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    """Write the figure atomically, then close it."""
    try:
        with atomic_path(path, suffix=".tmp" + Path(path).suffix) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return path


def environment() -> dict:
    """What every result carries: versions and machine."""
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: dict[str, str]) -> str:
    """A Markdown table: `columns` maps row keys to header labels."""
    header = list(columns.values())
    body = [[format_value(row.get(key)) for key in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def log_y(ax, label: str) -> None:
    """Log y axis with plain numbers; minor ticks labelled too (all within a decade, 2 and 5 within three)."""
    from matplotlib import ticker
    ax.set_yscale("log")
    ax.set_ylabel(label)
    low, high = ax.get_ylim()
    keep = (lambda m: True) if high / low < 10 else (lambda m: m in (2, 5)) if high / low < 1000 else (lambda m: False)
    mantissa = lambda v: round(v / 10 ** math.floor(math.log10(v)), 6)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and keep(mantissa(v)) else ""))
