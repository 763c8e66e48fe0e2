"""The report's figures as PNG bytes (matplotlib's Agg renderer; no display, no pyplot state).

Each function takes the tables of analysis.profile (or `feature_stats`) and returns
one PNG. Figures are built with `matplotlib.figure.Figure` directly, so importing this
module never changes the backend of a notebook that imports it.
"""

from __future__ import annotations

import io

import numpy as np
import polars as pl
from matplotlib.figure import Figure

DPI = 110


def _log_lines(axes, xlabel: str, ylabel: str, title: str, legend: dict | None = None) -> bytes:
    """Finish a plot of lines over layers on a log scale: labels, title, legend; its PNG."""
    axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(**(legend or {}))
    return _png(axes.figure)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def heatmap(maxima: pl.DataFrame, dims: list[int], num_layers: int, threshold: float) -> bytes:
    """max |x| per layer (rows) x dim (columns) for the chosen dims; the threshold marked."""
    grid = np.zeros((num_layers, len(dims)))  # [layer, dim]
    column = {dim: i for i, dim in enumerate(dims)}
    for layer, dim, value in maxima.filter(pl.col("dim").is_in(dims)).iter_rows():
        grid[layer, column[dim]] = value
    figure = Figure(figsize=(1.2 + 0.45 * len(dims), 1.2 + 0.3 * num_layers))
    axes = figure.subplots()
    image = axes.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    axes.set_xticks(range(len(dims)), [str(d) for d in dims], rotation=90)
    axes.set_yticks(range(num_layers))
    axes.set_xlabel("hidden dim (outlier features and largest others)")
    axes.set_ylabel("layer")
    axes.set_title("max |x| per layer and dim")
    bar = figure.colorbar(image, ax=axes)
    bar.ax.axhline(threshold, color="cyan", linewidth=1.5)  # where |x| counts as an outlier
    return _png(figure)


def coverage(per_dim: pl.DataFrame, dims: list[int], column: str, bar: float, title: str) -> bytes:
    """One bar per dim: the share in `column` (layer or token fraction), with the criterion's bar."""
    rows = per_dim.filter(pl.col("dim").is_in(dims)).sort("dim")
    figure = Figure(figsize=(1.5 + 0.4 * len(dims), 3.2))
    axes = figure.subplots()
    positions = np.arange(rows.height)
    axes.bar(positions, rows[column].to_numpy(), color="#4c72b0")
    axes.axhline(bar, color="#c44e52", linestyle="--", label=f"criterion {bar:g}")
    axes.set_xticks(positions, [str(d) for d in rows["dim"]], rotation=90)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("hidden dim")
    axes.set_ylabel(column.replace("_", " "))
    axes.set_title(title)
    axes.legend(loc="upper right")
    return _png(figure)


def massive(profile: pl.DataFrame) -> bytes:
    """Top-1/2/3 magnitudes against the median per layer, log scale (Sun et al. 2024)."""
    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.subplots()
    layers = profile["layer"].to_numpy()
    for name, style in (("top1", "-o"), ("top2", "-s"), ("top3", "-^")):
        axes.plot(layers, profile[name].to_numpy(), style, label=name.replace("top", "top-"))
    if profile["median_abs"].null_count() < profile.height:
        axes.plot(layers, profile["median_abs"].to_numpy(), "--", color="gray", label="median")
    return _log_lines(axes, "layer", "|x|", "massive activations: largest vs median magnitude")


def compare(profiles: dict[str, pl.DataFrame]) -> bytes:
    """Max |x| (solid) and median |x| (dashed) against relative depth, one colour per run."""
    figure = Figure(figsize=(7.0, 4.0))
    axes = figure.subplots()
    for (name, profile), color in zip(profiles.items(), _colors(len(profiles))):
        depth = profile["layer"].to_numpy() / max(1, profile.height - 1)
        axes.plot(depth, profile["top1"].to_numpy(), "-o", color=color, label=f"{name} max", markersize=3)
        if profile["median_abs"].null_count() < profile.height:
            axes.plot(depth, profile["median_abs"].to_numpy(), "--", color=color, label=f"{name} median")
    return _log_lines(axes, "relative depth (layer / (L - 1))", "|x|", "max and median |x| per layer across runs",
                      {"fontsize": "small"})


def _colors(count: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(count)]


def expert_heatmap(maxima: pl.DataFrame, num_layers: int) -> bytes:
    """max |output| per layer (rows) x routed expert (columns), log colour scale."""
    from matplotlib.colors import LogNorm

    routed = maxima.filter(pl.col("expert") >= 0)
    experts = int(routed["expert"].max()) + 1 if routed.height else 1
    grid = np.full((num_layers, experts), np.nan)  # [layer, expert]
    for layer, expert, value in routed.select("layer", "expert", "max_abs").iter_rows():
        grid[layer, expert] = value
    figure = Figure(figsize=(2.0 + min(0.12 * experts, 14), 1.2 + 0.25 * num_layers))
    axes = figure.subplots()
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    image = axes.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest", norm=norm)
    axes.set_xlabel("routed expert")
    axes.set_ylabel("layer")
    axes.set_title("max |expert output| per layer and expert")
    figure.colorbar(image, ax=axes)
    return _png(figure)


def massive_depth(medians: list, massive: list[dict]) -> bytes:
    """Median |x| of the residual stream per layer, and each massive dim's largest |x| per layer."""
    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.subplots()
    layers = np.arange(len(medians))
    axes.plot(layers, [np.nan if m is None else m for m in medians], "--", color="gray", label="median |x|")
    for (entry, color) in zip(massive[:8], _colors(len(massive[:8]))):
        axes.plot(entry["layers"], entry["layer_max"], "-o", color=color, markersize=3, label=f"dim {entry['dim']}")
    return _log_lines(axes, "layer", "|x| in the residual stream", "massive activations over depth",
                      {"fontsize": "small"})
