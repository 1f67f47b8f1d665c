"""The course's recurring plots: attention heatmaps and curves over a swept parameter.

Every function draws on ``ax`` (a new figure when ``None``) and returns the axes, so a
notebook can put several plots side by side. Tensors may live on any device: plotting
moves a detached copy to the CPU, which is the one place where that is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator
from matplotlib.lines import Line2D


def attention_heatmap(weights: torch.Tensor, x_labels: Sequence[str] | None = None,
                      y_labels: Sequence[str] | None = None, ax: plt.Axes | None = None,
                      title: str | None = None, value_label: str = "attention weight",
                      colorbar: bool = True, vmax: float | None = None) -> plt.Axes:
    """Draw (L, S) attention weights: one row per query, one column per key, colour = weight.

    Rows of a softmax sum to 1, so a bright cell means "this query reads this key".
    ``value_label`` names the colour scale when the matrix holds something else (e.g.
    gradient norms); without labels the ticks are the integer positions.
    """
    if weights.dim() != 2:
        raise ValueError(f"weights should have shape (L, S), got {tuple(weights.shape)}: "
                         "select one batch element and head first, e.g. weights[0, 0]")
    ax = ax if ax is not None else plt.subplots(figsize=(5, 4))[1]
    image = ax.imshow(weights.detach().float().cpu().numpy(), cmap="viridis", vmin=0.0,
                      vmax=vmax, aspect="auto")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=value_label)
    L, S = weights.shape
    if x_labels is not None:
        ax.set_xticks(range(S), x_labels, rotation=45, ha="right")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y_labels is not None:
        ax.set_yticks(range(L), y_labels)
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title or "attention weights (each row sums to 1)")
    return ax


def curves(x: Sequence[float], series: Mapping[str, Sequence[float]], xlabel: str,
           ylabel: str, title: str, ax: plt.Axes | None = None, log_x: bool = False,
           log_y: bool = False) -> plt.Axes:
    """One line with markers per entry of ``series`` (label -> values at each ``x``).

    The course's sweeps: e.g. dot-product variance or softmax saturation vs the head
    dimension d_k, with and without the 1/sqrt(d_k) scaling.
    """
    ax = ax if ax is not None else plt.subplots(figsize=(5, 3.5))[1]
    for label, values in series.items():
        ax.plot(list(x), [float(value) for value in values], marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    if log_x:  # label the swept values themselves (1, 4, 16 ...), not powers of 2
        xs = [float(value) for value in x]
        ax.set_xticks(xs, [f"{value:g}" for value in xs])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return ax


def head_patterns(weights: torch.Tensor, head_titles: Sequence[str] | None = None,
                  title: str = "attention pattern of each head",
                  labels: Sequence[str] | None = None, xlabel: str = "key",
                  ylabel: str = "query") -> plt.Figure:
    """One :func:`attention_heatmap` per head, side by side, from (H, L, S) weights.

    Heads of one layer that learned different lookups (Voita et al., 2019; Clark et al.,
    2019) show different patterns: a diagonal one step below the main one is a
    "previous token" head, a bright first column a "first token" head.
    """
    if weights.dim() != 3:
        raise ValueError(f"weights should have shape (H, L, S), got {tuple(weights.shape)}: "
                         "select one batch element first (or average over the batch)")
    n_heads = weights.shape[0]
    figure, axes = plt.subplots(1, n_heads, figsize=(3.3 * n_heads + 0.8, 3.4), squeeze=False,
                                layout="constrained")
    vmax = float(weights.detach().max())  # one colour scale, so heads compare at a glance
    for head, ax in enumerate(axes[0]):
        name = head_titles[head] if head_titles is not None else f"head {head}"
        attention_heatmap(weights[head], x_labels=labels, y_labels=labels, ax=ax, title=name,
                          colorbar=False, vmax=vmax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel if head == 0 else "")
    figure.colorbar(axes[0, -1].images[0], ax=axes[0].tolist(), label="attention weight")
    figure.suptitle(title)
    return figure


def gradient_norm_by_distance(norms: Mapping[str, torch.Tensor],
                              bounds: Mapping[str, torch.Tensor] | None = None,
                              ax: plt.Axes | None = None, title: str | None = None) -> plt.Axes:
    """How much the last state still feels each earlier input, on a log scale.

    ``norms`` maps a label (e.g. "ρ = 0.9") to a ``(L,)`` tensor whose entry ``k`` is
    ``||∂h_L/∂x_{L-k}||``, the distance ``k`` counted back from the last input. ``bounds``
    (same labels) are drawn dashed in the same colour: a straight line on this log scale is
    an exponential in the distance.
    """
    ax = ax if ax is not None else plt.subplots(figsize=(6, 4))[1]
    for label, values in norms.items():
        values = values.detach().double().cpu()
        (line,) = ax.plot(range(len(values)), values.numpy(), label=label)
        if bounds is not None and label in bounds:
            bound = bounds[label].detach().double().cpu()
            ax.plot(range(len(bound)), bound.numpy(), linestyle="--", color=line.get_color(),
                    alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("distance k back from the last input (steps)")
    ax.set_ylabel(r"gradient norm $\|\partial h_L / \partial x_{L-k}\|$")
    ax.set_title(title or "gradients shrink (or blow up) exponentially with distance")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if bounds:  # one legend entry for all the dashed bounds, not drawn as a line of its own
        handles.append(Line2D([], [], linestyle="--", color="gray"))
        labels.append("upper bound\n(dashed, same colour)")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # clear of the data
    return ax


def accuracy_by_distance(distances: Sequence[int], accuracies: Mapping[str, Sequence[float]],
                         chance: float | None = None, ax: plt.Axes | None = None,
                         title: str | None = None) -> plt.Axes:
    """Recall accuracy against the distance to the token to recall, one line per model.

    ``chance`` (e.g. 1 / vocabulary size) is drawn as a dotted line: a model on it has
    remembered nothing.
    """
    ax = ax if ax is not None else plt.subplots(figsize=(6, 4))[1]
    for label, values in accuracies.items():
        ax.plot(list(distances), [float(value) for value in values], marker="o", label=label)
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="gray", label=f"chance ({chance:.3g})")
    ax.set_xticks(list(distances))  # tick exactly the distances that were measured
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("distance to the token to recall (steps)")
    ax.set_ylabel("recall accuracy")
    ax.set_title(title or "recall accuracy falls with distance")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return ax


def quality_by_memory(curves: Mapping[str, Sequence[tuple[float, float]]],
                      points: Mapping[str, tuple[float, float]], ceiling: float,
                      chance: tuple[float, str] | None = None, ax: plt.Axes | None = None,
                      ylabel: str = "quality", title: str | None = None) -> plt.Axes:
    """Quality against the memory a compressed cache holds (lesson 09), one plot for all.

    ``curves`` map a method to (memory fraction, quality) pairs over its budgets (eviction);
    ``points`` map a method to one pair (a quantization width); ``ceiling`` is the full
    cache's quality, dashed; ``chance`` (level, label) a dotted floor.
    """
    ax = ax if ax is not None else plt.subplots(figsize=(8, 5))[1]
    for label, pairs in curves.items():
        ax.plot([m for m, _ in pairs], [q for _, q in pairs], marker="o", label=label)
    for label, (memory, quality) in points.items():
        ax.plot([memory], [quality], marker="*", markersize=14, linestyle="", label=label)
    ax.axhline(ceiling, color="gray", linestyle="--", label="full cache")
    if chance is not None:
        ax.axhline(chance[0], color="gray", linestyle=":", label=chance[1])
    ax.set_xlabel("cache memory at the end, as a fraction of the full cache")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05 * max(ceiling, 1e-9))
    ax.set_title(title or "quality against cache memory")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return ax
