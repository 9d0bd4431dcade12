"""Figures and GIFs of ``genserve report`` (matplotlib's Agg canvas, no pyplot, no display).

Every function takes arrays already in data units and writes one file; nothing here knows a
model. Figures are drawn on ``matplotlib.figure.Figure`` with an Agg canvas, so no global
pyplot state is touched and the same arrays give the same bytes. Point sets are
``(n, 2)``; ``limits`` is ``((xmin, xmax), (ymin, ymax))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Generation",
    "anomaly_histogram",
    "density_figure",
    "generation_gif",
    "roc_figure",
    "samples_figure",
    "snapshots_figure",
    "trajectories_figure",
    "vector_fields_figure",
]

Limits = tuple[tuple[float, float], tuple[float, float]]
REAL = "0.55"  # grey for the real data
PANEL = 3.2  # inches per panel
DPI = 90
GIF_DPI = 60
FRAME_MS = 120


@dataclass(frozen=True)
class Generation:
    """One model's generation process, in data units.

    Attributes:
        name: file-safe model name (``nsf``, ``otcfm-reflow``).
        family: the model's family.
        process: honest words for what was run (solver, steps, layers).
        path_times: ``(T,)`` position along the process, 1 = noise, 0 = data (flows: the
            share of layers still to invert).
        path: ``(T, n, 2)`` states along the process; ``path[0]`` noise, ``path[-1]`` samples.
        labels: ``(T,)`` what each state is ("t = 0.50", "layer 2/4 inverted").
        frames: ``(F,)`` indices into ``path`` shown in the GIFs.
        nfe: network evaluations over the whole process (flows: 1 inverse pass).
        color: the model's colour index, the same in every figure.
    """

    name: str
    family: str
    process: str
    path_times: np.ndarray
    path: np.ndarray
    labels: list[str]
    frames: np.ndarray
    nfe: int
    color: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.family.replace('_', ' ')})"

    def straightness(self) -> float:
        """Mean over points of path length / distance from start to end (1 = straight)."""
        length = np.linalg.norm(np.diff(self.path, axis=0), axis=-1).sum(0)
        chord = np.linalg.norm(self.path[-1] - self.path[0], axis=-1)
        return float(np.mean(length / np.maximum(chord, 1e-12)))

    def time_label(self, index: int) -> str:
        return self.labels[index]



def _figure(rows: int, cols: int, *, dpi: int = DPI, size: float = PANEL) -> tuple[Any, Any]:
    """A figure with an Agg canvas and a ``(rows, cols)`` array of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size * cols, size * rows + 0.3), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _color(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _frame(ax: Any, limits: Limits, title: str) -> None:
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])  # axis ticks cost most of the drawing time and add little here
    ax.set_yticks([])


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=fig.dpi, metadata={"Software": None})


def samples_figure(real: np.ndarray,
                   generated: Sequence[tuple[Generation, np.ndarray, str, float | None]],
                   limits: Limits, path: Path) -> None:
    """Real rows, then each model's samples: ``generated = [(gen, x, sampler, w2), ...]``."""
    fig, axes = _figure(1, 1 + len(generated))
    axes[0, 0].scatter(real[:, 0], real[:, 1], s=2, c=REAL, alpha=0.6, linewidths=0)
    _frame(axes[0, 0], limits, f"real (held-out test rows, n={len(real)})")
    for i, (gen, x, sampler, w2) in enumerate(generated):
        ax = axes[0, i + 1]
        ax.scatter(x[:, 0], x[:, 1], s=2, color=_color(gen.color), alpha=0.6, linewidths=0)
        score = "" if w2 is None else f"; W2 to test {w2:.3f}"
        _frame(ax, limits, f"{gen.label}, n={len(x)}\n{sampler}{score}")
    _save(fig, path)


def trajectories_figure(gens: Sequence[Generation], real: np.ndarray, limits: Limits,
                        path: Path, lines: int = 60) -> None:
    """Paths of ``lines`` points from noise (black) to data (coloured), one panel per model."""
    fig, axes = _figure(1, len(gens))
    for i, gen in enumerate(gens):
        ax = axes[0, i]
        ax.scatter(real[:, 0], real[:, 1], s=1, c=REAL, alpha=0.25, linewidths=0)
        k = min(lines, gen.path.shape[1])
        ax.plot(gen.path[:, :k, 0], gen.path[:, :k, 1], color=_color(gen.color), lw=0.6, alpha=0.7)
        ax.scatter(gen.path[0, :k, 0], gen.path[0, :k, 1], s=4, c="black", linewidths=0)
        ax.scatter(gen.path[-1, :k, 0], gen.path[-1, :k, 1], s=6, color=_color(gen.color),
                   linewidths=0)
        _frame(ax, limits, f"{gen.label}\n{gen.process}\n"
                           f"straightness (path/chord) {gen.straightness():.3f}")
    _save(fig, path)


def snapshots_figure(gens: Sequence[Generation], limits: Limits, path: Path,
                     count: int = 5) -> None:
    """The distribution at ``count`` evenly spaced points of each generation process."""
    fig, axes = _figure(len(gens), count, size=2.4)
    for row, gen in enumerate(gens):
        picks = np.round(np.linspace(0, len(gen.path_times) - 1, count)).astype(int)
        for col, index in enumerate(picks):
            x = gen.path[index]
            ax = axes[row, col]
            ax.scatter(x[:, 0], x[:, 1], s=1.5, color=_color(gen.color), alpha=0.6, linewidths=0)
            _frame(ax, limits, f"{gen.label}: {gen.time_label(index)}")
    _save(fig, path)


def _message(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9)
    ax.set_axis_off()


def vector_fields_figure(fields: Sequence[tuple[Generation, list[tuple[float, np.ndarray]]]],
                         points: np.ndarray, real: np.ndarray, limits: Limits,
                         path: Path) -> None:
    """Quiver of the generation direction ``-dx/dt``: ``fields = [(gen, [(t, (m, 2)), ...])]``
    at ``points: (m, 2)``; one row per model, one column per time. Arrow length is
    proportional to the square root of the speed, so slow regions still show a direction."""
    if not fields:
        fig, axes = _figure(1, 1)
        _message(axes[0, 0], "no diffusion or flow-matching model in this report")
        _save(fig, path)
        return
    cols = max(len(v) for _, v in fields)
    fig, axes = _figure(len(fields), cols, size=2.6)
    for row, (gen, per_time) in enumerate(fields):
        for col, (t, v) in enumerate(per_time):
            ax = axes[row, col]
            ax.scatter(real[:, 0], real[:, 1], s=1, c=REAL, alpha=0.25, linewidths=0)
            speed = np.linalg.norm(v, axis=1, keepdims=True)
            shown = v / np.sqrt(np.maximum(speed, 1e-12))  # slow arrows stay visible
            ax.quiver(points[:, 0], points[:, 1], shown[:, 0], shown[:, 1],
                      color=_color(gen.color), angles="xy", width=0.006)
            _frame(ax, limits, f"{gen.label}\n-dx/dt at t = {t:.2f} (max speed "
                               f"{float(speed.max()):.2g})")
    _save(fig, path)


def density_figure(panels: Sequence[tuple[str, np.ndarray]], limits: Limits,
                   path: Path, span: float = 12.0) -> None:
    """Heatmaps of log p over a ``(G, G)`` grid spanning ``limits``, on one colour scale
    (the top ``span`` nats; lower values and -inf are drawn at the bottom of the scale)."""
    if not panels:
        fig, axes = _figure(1, 1)
        _message(axes[0, 0], "no flow in this report and no known true density")
        _save(fig, path)
        return
    top = max(float(np.max(v[np.isfinite(v)], initial=-np.inf)) for _, v in panels)
    vmin = top - span
    fig, axes = _figure(1, len(panels))
    extent = (*limits[0], *limits[1])
    for i, (title, values) in enumerate(panels):
        ax = axes[0, i]
        shown = np.where(np.isfinite(values), np.maximum(values, vmin), vmin)
        image = ax.imshow(shown, origin="lower", extent=extent, vmin=vmin, vmax=top,
                          cmap="viridis", aspect="equal", interpolation="nearest")
        _frame(ax, limits, title)
        bar = fig.colorbar(image, ax=ax, shrink=0.8)
        bar.set_label("log p(x), nats", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    _save(fig, path)


def generation_gif(gens: Sequence[Generation], real: np.ndarray, limits: Limits,
                   path: Path) -> None:
    """One frame per ``gen.frames`` entry (all models share the count), one panel per model,
    real data faint behind; written with Pillow, looping."""
    from PIL import Image

    fig, axes = _figure(1, len(gens), dpi=GIF_DPI)
    dots = []
    for i, gen in enumerate(gens):
        ax = axes[0, i]
        ax.scatter(real[:, 0], real[:, 1], s=1, c=REAL, alpha=0.25, linewidths=0)
        start = gen.path[gen.frames[0]]
        dots.append(ax.scatter(start[:, 0], start[:, 1], s=2, color=_color(gen.color),
                               linewidths=0))
        _frame(ax, limits, gen.label)
    count = len(gens[0].frames)
    images = []
    for f in range(count):
        for i, gen in enumerate(gens):
            dots[i].set_offsets(gen.path[gen.frames[f]])
            axes[0, i].set_title(f"{gen.label}\n{gen.time_label(gen.frames[f])}", fontsize=8)
        fig.suptitle(f"noise -> data, frame {f + 1}/{count}", fontsize=8)
        fig.canvas.draw()
        fig.set_layout_engine("none")  # the first frame's layout serves them all
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
    durations = [FRAME_MS] * (count - 1) + [FRAME_MS * 8]  # rest on the samples
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def anomaly_histogram(normal: np.ndarray, anomalous: np.ndarray, threshold: float, name: str,
                      path: Path, bins: int = 60) -> None:
    """Histograms of anomaly scores (NLL, nats) of normal and anomalous rows, threshold
    marked; scores outside the central 99% of all rows are counted in the edge bins."""
    both = np.concatenate([normal, anomalous])
    lo, hi = np.quantile(both, [0.005, 0.995])
    lo, hi = min(lo, threshold), max(hi, threshold)
    edges = np.linspace(lo, hi + 1e-9 * max(1.0, abs(hi)), bins + 1)
    fig, axes = _figure(1, 1, size=4.5)
    ax = axes[0, 0]
    for i, (label, s) in enumerate((("normal", normal), ("anomalous", anomalous))):
        flagged = 100 * float(np.mean(s > threshold))
        ax.hist(np.clip(s, lo, hi), bins=edges, alpha=0.55, color=_color(i), density=True,
                label=f"{label} ({len(s)} rows, {flagged:.1f}% flagged)")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("anomaly score (negative log-likelihood, nats)", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.set_title(f"{name}: anomaly scores", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    _save(fig, path)


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, auroc: float, point: tuple[float, float],
               name: str, path: Path) -> None:
    """ROC curve with the calibrated threshold's operating point ``(fpr, tpr)`` marked."""
    fig, axes = _figure(1, 1, size=4.0)
    ax = axes[0, 0]
    ax.plot(fpr, tpr, drawstyle="steps-post", color=_color(0), label=f"AUROC {auroc:.3f}")
    ax.plot([0, 1], [0, 1], color=REAL, ls=":", lw=1, label="chance")
    ax.scatter([point[0]], [point[1]], color="black", zorder=3,
               label=f"calibrated threshold (FPR {point[0]:.3f}, TPR {point[1]:.3f})")
    ax.set_xlabel("false-positive rate (normal rows flagged)", fontsize=8)
    ax.set_ylabel("true-positive rate (anomalous rows flagged)", fontsize=8)
    ax.set_title(f"{name}: ROC", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(labelsize=7)
    _save(fig, path)


def manifold_figure(real: np.ndarray, samples: np.ndarray, manifold: str, title: str,
                    path: Path) -> None:
    """Rows on a manifold next to a model's samples: the sphere S^2 in 3-D (a wire sphere
    behind the points), the torus T^2 on its unrolled square ``[-pi, pi]^2``."""
    panels = [(f"real (test rows, n={len(real)})", real, REAL),
              (f"{title}, n={len(samples)}", samples, _color(0))]
    if manifold == "sphere":
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(PANEL * 2, PANEL + 0.3), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 25), np.linspace(0, np.pi, 13))
        for i, (label, x, color) in enumerate(panels):
            ax = fig.add_subplot(1, 2, i + 1, projection="3d")
            ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v),
                              color="0.85", linewidth=0.3)
            ax.scatter(x[:, 0], x[:, 1], x[:, 2], s=5, color=color, alpha=0.9, linewidths=0)
            ax.set_box_aspect((1, 1, 1))
            ax.set_axis_off()
            ax.set_title(label, fontsize=8)
        _save(fig, path)
        return
    fig, axes = _figure(1, 2)
    square = ((-np.pi, np.pi), (-np.pi, np.pi))
    for ax, (label, x, color) in zip(axes[0], panels, strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=2, color=color, alpha=0.6, linewidths=0)
        _frame(ax, square, f"{label}\n(the torus unrolled: opposite edges meet)")
    _save(fig, path)
