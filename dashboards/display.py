"""Building blocks for the dashboards: figures, tables, numbers and failures as sentences.

Plots are bqplot figures and tables ipydatagrid grids (widgets whose JavaScript ships
in the Python packages, so a page loads nothing from the internet). :func:`show` runs a
part of a dashboard and, should it fail, shows a sentence in its place instead of a
traceback, and logs the details for the operator.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import bqplot as bq
import ipywidgets as w
import pandas as pd
from IPython.display import display

from gpuportal.provider.money import format_credits

from .client import PortalError

log = logging.getLogger("gpuportal.dashboards")


def _log_to_the_service() -> None:
    """Errors and library warnings go to the service's log (the kernel process's own
    stderr, which the hub keeps), never onto the page: a kernel's ``sys.stderr`` is the
    page's output."""
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter("[%(levelname)1.1s %(name)s] %(message)s"))
    logging.captureWarnings(True)
    for name in ("gpuportal.dashboards", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


if "VOILA_PREHEAT" in os.environ:  # a Voila kernel (Voila sets it for each one)
    _log_to_the_service()

COLOURS = ["#3b6ea5", "#e07b39", "#4d9a6a", "#b0487a", "#7d6bb3", "#c9a227", "#5b8e9c"]
CSS = """
<style>
.gp-kpi { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 14px; margin: 4px;
          min-width: 11em; background: #f6f8fa; }
.gp-kpi .gp-label { color: #57606a; font-size: 12px; }
.gp-kpi .gp-value { font-size: 22px; font-weight: 600; }
.gp-problem { color: #8a1c1c; background: #fdecea; border-radius: 6px; padding: 8px 12px; }
.gp-alert-error { color: #8a1c1c; } .gp-alert-warning { color: #7a5a00; }
.gp-empty { color: #57606a; font-style: italic; }
</style>
"""


def credits(micro: int | float) -> str:
    """Micro-credits as the portal writes them (two decimals, floor)."""
    return format_credits(int(micro))


def problem(message: str) -> w.HTML:
    return w.HTML(f'<p class="gp-problem">{_escape(message)}</p>')


def empty(message: str) -> w.HTML:
    return w.HTML(f'<p class="gp-empty">{_escape(message)}</p>')


def _escape(text: str) -> str:
    from html import escape

    return escape(str(text))


def show(build: Callable[..., Any], *args: Any) -> None:
    """Display what ``build(*args)`` returns; a failure becomes a sentence, logged."""
    try:
        widget = build(*args)
    except PortalError as exc:
        widget = problem(str(exc))
    except Exception:
        log.exception("dashboard part %s failed", getattr(build, "__name__", build))
        widget = problem("This part of the dashboard could not be drawn; the error is logged.")
    if widget is not None:
        display(widget)


def styles() -> w.HTML:
    return w.HTML(CSS)


def kpis(items: Iterable[tuple[str, str]]) -> w.HBox:
    """A row of labelled numbers."""
    return w.HBox(
        [
            w.HTML(
                f'<div class="gp-kpi"><div class="gp-label">{_escape(label)}</div>'
                f'<div class="gp-value">{_escape(value)}</div></div>'
            )
            for label, value in items
        ],
        layout=w.Layout(flex_flow="row wrap"),
    )


def title(text: str, level: int = 3) -> w.HTML:
    return w.HTML(f"<h{level}>{_escape(text)}</h{level}>")


def table(frame: pd.DataFrame, height: int | None = None) -> w.Widget:
    """A grid of ``frame`` keyed by its first column; a sentence when it is empty.

    Cells are shown as text, each column as wide as its longest value, so nothing is cut.
    """
    from ipydatagrid import DataGrid

    if frame.empty:
        return empty("Nothing to show yet.")
    shown = frame.reset_index(drop=True).astype(str)
    key = shown.columns[0]

    def width(column: str) -> int:
        longest = max([len(column), *(len(v) for v in shown[column])])
        return min(320, 24 + 8 * longest)

    grid = DataGrid(
        shown.set_index(key),
        base_row_header_size=width(key),
        column_widths={c: width(c) for c in shown.columns[1:]},
        selection_mode="cell",
        layout=w.Layout(height=f"{height or min(400, 36 + 26 * len(shown))}px", width="100%"),
    )
    return grid


def lines(
    frame: pd.DataFrame, x: str, y: str, by: str | None, y_label: str, *, dates: bool = True
) -> w.Widget:
    """One line per value of ``by`` (or one line), ``y`` against ``x``."""
    if frame.empty:
        return empty("No data in this period yet.")
    xs = bq.DateScale() if dates else bq.OrdinalScale()
    ys = bq.LinearScale(min=0)
    marks = []
    groups = [(None, frame)] if by is None else list(frame.groupby(by, sort=True))
    for i, (name, part) in enumerate(groups):
        part = part.sort_values(x)
        xv = pd.to_datetime(part[x]).to_numpy() if dates else part[x].astype(str).to_numpy()
        marks.append(
            bq.Lines(
                x=xv,
                y=part[y].astype(float).to_numpy(),
                scales={"x": xs, "y": ys},
                colors=[COLOURS[i % len(COLOURS)]],
                labels=[str(name)] if name is not None else [],
                display_legend=name is not None,
            )
        )
    return bq.Figure(
        marks=marks,
        axes=[bq.Axis(scale=xs), bq.Axis(scale=ys, side="left", label=y_label)],
        layout=w.Layout(width="100%", height="300px"),
        fig_margin={"top": 20, "bottom": 40, "left": 60, "right": 20},
        legend_location="top-left",
    )


def bars(frame: pd.DataFrame, x: str, y: str, y_label: str, colour: int = 0) -> w.Widget:
    """Bars of ``y`` per ``x`` (categories, in order)."""
    if frame.empty:
        return empty("No data in this period yet.")
    xs = bq.OrdinalScale()
    ys = bq.LinearScale(min=0)
    mark = bq.Bars(
        x=frame[x].astype(str).to_numpy(),
        y=frame[y].astype(float).to_numpy(),
        scales={"x": xs, "y": ys},
        colors=[COLOURS[colour % len(COLOURS)]],
    )
    return bq.Figure(
        marks=[mark],
        axes=[bq.Axis(scale=xs), bq.Axis(scale=ys, side="left", label=y_label)],
        layout=w.Layout(width="100%", height="280px"),
        fig_margin={"top": 20, "bottom": 60, "left": 60, "right": 20},
    )


def alerts(items: list[dict[str, str]]) -> w.Widget:
    if not items:
        return empty("No alerts: every node is online, verified and reliable.")
    return w.HTML(
        "<ul>"
        + "".join(
            f'<li class="gp-alert-{_escape(a["level"])}">{_escape(a["message"])}</li>'
            for a in items
        )
        + "</ul>"
    )
