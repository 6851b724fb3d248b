"""Dossier figures, rendered with matplotlib's Agg canvas directly (no pyplot, so no global backend or figure state)
under matplotlib's default style, with PNG metadata fixed so the same input gives the same bytes."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import matplotlib
import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from forensics.evidence.atomic import atomic_write_bytes
from forensics.report.view import AGGREGATE, DossierView, Null, kind_of

DPI = 200
WIDTH_IN = 6.6  # the dossier's text column is 17 cm (6.7 in); figures are placed at their natural size
# The suspect is drawn thick and underneath, so a candidate that coincides with it stays visible on top.
SUSPECT_STYLE = {"color": "black", "linewidth": 2.4, "zorder": 2}
CANDIDATE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
# Software would record the matplotlib version; leaving every text chunk out keeps the bytes reproducible.
PNG_METADATA = {"Software": None}
PANELS_PER_FIGURE = 9  # 3 x 3 panels keep one figure within a page
# What a curve panel's values are, by signal kind (forensics/report/view.py kind_of).
Y_LABELS = {"weight_std": "std", "attention_spectrum": "effective rank", "act_norm": "norm",
            "act_norm_std": "norm spread"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with matplotlib.style.context("default"):
        fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA, bbox_inches="tight", pad_inches=0.04)
    return atomic_write_bytes(path, buf.getvalue())


def candidate_colors(view: DossierView) -> dict[str, str]:
    """One colour per candidate, the same in every figure."""
    return {c.name: CANDIDATE_COLORS[i % len(CANDIDATE_COLORS)] for i, c in enumerate(view.candidates)}


def signal_curves(view: DossierView, labels: list[str], path: Path) -> Path:
    return _save(curves_figure(view, labels), path)


def curves_figure(view: DossierView, labels: list[str]) -> Figure:
    """One panel per signal: z-scored curves of the suspect and every candidate over depth.

    The x axis is the layer index when all plotted curves have as many layers, relative depth otherwise.
    """
    colors = candidate_colors(view)
    ncols = min(3, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(WIDTH_IN, 0.6 + 1.9 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        handles = {}
        for ax, label in zip(axes.flat, labels):
            curves = {name: view.models[name].z[sig] for name, sig in view.curve_pair(label).items()
                      if sig in view.models[name].z}
            relative = len({len(c) for c in curves.values() if c is not None}) > 1
            flat = []
            for i, (name, z) in enumerate(curves.items()):
                if z is None:
                    flat.append(name)
                    continue
                xs = [j / (len(z) - 1) if relative else j for j in range(len(z))]
                ys = [math.nan if v is None else v for v in z]
                # Dashes on every other candidate keep overlapping curves apart in greyscale print.
                style = SUSPECT_STYLE if name == view.suspect else {
                    "color": colors[name], "linewidth": 1.2, "zorder": 3, "linestyle": "--" if i % 2 == 0 else "-"}
                (line,) = ax.plot(xs, ys, label=name, **style)
                handles.setdefault(name, line)
            ax.set_title(label + (" (flat)" if flat else ""), fontsize=8)
            ax.set_xlabel("relative depth" if relative else "layer", fontsize=7)
            ax.set_ylabel(f"{Y_LABELS.get(kind_of(label), 'value')} (z-score)", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3, linewidth=0.5)
            if len(flat) == len(curves):
                ax.set_xticks([])
                ax.set_yticks([])
            if flat:
                ax.text(0.5, 0.5, "flat, no shape to compare:\n" + "\n".join(flat), transform=ax.transAxes,
                        ha="center", va="center", fontsize=6.5, color="#555555")
        for ax in list(axes.flat)[len(labels):]:
            ax.set_visible(False)
        names = [view.suspect] + [c.name for c in view.candidates]
        handles = {n: handles[n] for n in names if n in handles}
        legend = [f"{n} (suspect)" if n == view.suspect else n for n in handles]
        fig.legend(list(handles.values()), legend, loc="outside lower center", ncols=min(4, len(handles)),
                   fontsize=7, frameon=False)
    return fig


def similarity_heatmap(view: DossierView, path: Path) -> Path:
    """The statistics' r of the suspect against each candidate (rows) on each compared signal (columns)."""
    hm = view.heatmap
    rows, cols = len(hm.candidates), len(hm.signals)
    values = [[math.nan if v is None else v for v in row] for row in hm.matrix]
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(WIDTH_IN, 1.4 + 0.45 * rows), layout="constrained")
        ax = fig.subplots()
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
        im = ax.imshow(values, cmap=cmap, vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(cols), hm.signals, rotation=60, ha="right", rotation_mode="anchor", fontsize=6.5)
        ax.set_yticks(range(rows), hm.candidates, fontsize=7)
        if cols <= 24:
            for i in range(rows):
                for j in range(cols):
                    v = values[i][j]
                    ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if not math.isnan(v) and abs(v) > 0.6 else "black")
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.set_label("similarity (Pearson r)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
        return _save(fig, path)


def null_distribution(view: DossierView, null: Null, path: Path) -> Path:
    """Histogram of the similarity of unrelated pairs on one signal, with each candidate's observed value marked."""
    colors = candidate_colors(view)
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(WIDTH_IN, 3.2), layout="constrained")
        ax = fig.subplots()
        bins = max(10, min(40, int(math.sqrt(len(null.values)) * 2)))
        ax.hist(null.values, bins=bins, color="#bbbbbb", edgecolor="#777777", linewidth=0.5,
                label=f"unrelated pairs (n = {len(null.values)})")
        for name, value in null.observed.items():
            ax.axvline(value, color=colors.get(name, "black"), linewidth=1.8, label=f"{name}: {value:.3f}")
        ax.set_xlabel(f"similarity on {null.label} (Pearson r)", fontsize=8)
        ax.set_ylabel("number of pairs", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.legend(fontsize=7, frameon=False, loc="outside lower center", ncols=min(4, 1 + len(null.observed)))
        return _save(fig, path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def render_all(view: DossierView, fig_dir: Path) -> dict[str, list[Path]]:
    """Every figure the dossier uses: ``curves:<kind>`` (one or more figures of panels), ``heatmap`` (when any
    signal was compared), and ``null:<signal>`` for each null distribution that has values."""
    out: dict[str, list[Path]] = {}
    for kind, labels in view.signal_kinds.items():
        if kind == AGGREGATE:
            continue  # an aggregate is a mean of the roles' r, with no curve of its own
        chunks = [labels[i:i + PANELS_PER_FIGURE] for i in range(0, len(labels), PANELS_PER_FIGURE)]
        out[f"curves:{kind}"] = [signal_curves(view, chunk, fig_dir / f"curves_{_slug(kind)}_{k + 1}.png")
                                 for k, chunk in enumerate(chunks)]
    if view.heatmap.signals:
        out["heatmap"] = [similarity_heatmap(view, fig_dir / "heatmap.png")]
    for null in view.nulls:
        if null.values:
            out[f"null:{null.label}"] = [null_distribution(view, null, fig_dir / f"null_{_slug(null.label)}.png")]
    return out
