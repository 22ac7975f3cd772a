"""Small matplotlib helpers for the labs (each returns its figure)."""
from __future__ import annotations

from typing import Sequence

import torch


def _plt():
    import matplotlib.pyplot as plt

    return plt


def show_samples(split, per_class: int = 4, title: str | None = None):
    """A grid of ``per_class`` images for each class of ``split``."""
    plt = _plt()
    classes = split.classes
    fig, axes = plt.subplots(per_class, len(classes), figsize=(1.1 * len(classes), 1.15 * per_class))
    mean = torch.tensor(split.mean).view(3, 1, 1)
    std = torch.tensor(split.std).view(3, 1, 1)
    for c, name in enumerate(classes):
        idx = (split.labels == c).nonzero().flatten()[:per_class]
        for r in range(per_class):
            ax = axes[r, c]
            ax.axis("off")
            if r < len(idx):
                img = split.images[idx[r]]
                img = img.float() / 255 if img.dtype == torch.uint8 else img * std + mean
                ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
        axes[0, c].set_title(name, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def errorbar(xs: Sequence, summaries: Sequence, xlabel: str, ylabel: str = "test accuracy (%)", label: str | None = None,
             ax=None, logx: bool = False, hlines: dict | None = None, title: str | None = None):
    """Mean +- std of :class:`~kdcourse.runs.Summary` objects against ``xs``;
    ``hlines`` maps a label to a reference accuracy (a fraction)."""
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
    else:
        fig = ax.figure
    means = [100 * s.mean for s in summaries]
    stds = [100 * s.std for s in summaries]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    for i, (name, value) in enumerate((hlines or {}).items()):
        ax.axhline(100 * value, linestyle="--", color=f"C{i + 1}", label=name)
    if logx:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bars(probs_by_label: dict, class_names: Sequence[str], title: str | None = None):
    """Grouped bar chart of several probability vectors over the same classes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    k = len(probs_by_label)
    width = 0.8 / max(1, k)
    for i, (label, p) in enumerate(probs_by_label.items()):
        xs = [j + (i - (k - 1) / 2) * width for j in range(len(class_names))]
        ax.bar(xs, [float(v) for v in p], width=width, label=label)
    ax.set_xticks(range(len(class_names)))
    ax.set_xticklabels(class_names, rotation=30, fontsize=8)
    ax.set_ylabel("probability")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def history(histories: dict, key: str = "val_acc", ylabel: str = "validation accuracy"):
    """One line per run: ``key`` of each epoch."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, hist in histories.items():
        ax.plot(hist.series("epoch"), hist.series(key), label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def twin_series(history, left: str, right: str, left_label: str | None = None, right_label: str | None = None,
                title: str | None = None, figsize=(5, 2.6)):
    """Two logged series of one :class:`~kdcourse.train.History` against the
    epoch, ``left`` on the left axis (colour C0) and ``right`` on a twin
    right axis (C1) — e.g. a temperature and a loss weight of a schedule."""
    plt = _plt()
    for key in (left, right):
        if all(v is None for v in history.series(key)):
            raise KeyError(f"twin_series: the history logged no {key!r}; "
                           f"name a series the training loop records (e.g. 'val_acc', 'T', 'alpha')")
    fig, ax = plt.subplots(figsize=figsize)
    epochs, ax_right = history.series("epoch"), ax.twinx()
    ax.plot(epochs, history.series(left), color="C0")
    ax.set_ylabel(left_label or left, color="C0")
    ax_right.plot(epochs, history.series(right), color="C1")
    ax_right.set_ylabel(right_label or right, color="C1")
    ax.set_xlabel("epoch")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
