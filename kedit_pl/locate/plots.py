"""Causal-trace figures in the style of ROME (Meng et al. 2022) Fig. 1 and Fig. 2, written as PNGs."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kedit_pl.io import atomic_path  # noqa: E402
from kedit_pl.locate.causal_trace import GROUPS, TraceResult  # noqa: E402

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_NAMES = {"hidden": "single hidden state", "mlp": "MLP", "attn": "Attn"}
GROUP_LABELS = {"first_subject": "First subject token", "middle_subject": "Middle subject tokens",
                "last_subject": "Last subject token", "first_subsequent": "First subsequent token",
                "further": "Further tokens", "last": "Last token"}


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def _xlabel(kind: str, window: int, model_name: str) -> str:
    if kind == "hidden" or window == 1:
        return f"single restored {'' if kind == 'hidden' else KIND_NAMES[kind] + ' '}layer within {model_name}"
    return f"center of interval of {window} restored {KIND_NAMES[kind]} layers"


def _layer_ticks(ax, n_layers: int) -> None:
    step = 5 if n_layers > 12 else 2
    ax.set_xticks([0.5 + i for i in range(0, n_layers, step)])
    ax.set_xticklabels(list(range(0, n_layers, step)))


def plot_trace_heatmap(result: TraceResult, kind: str, path: str | os.PathLike, model_name: str = "the model") -> Path:
    """One fact: P*_restored[o] per (token, layer); subject tokens marked '*'; colour floor at P*[o] (Fig. 1)."""
    scores = result.scores[kind].numpy()
    s, e = result.subject_range
    labels = [repr(t)[1:-1] + ("*" if s <= i < e else "") for i, t in enumerate(result.tokens)]
    fig, ax = plt.subplots(figsize=(4.2, 0.25 * len(labels) + 1.2), dpi=150)
    h = ax.pcolor(scores, cmap=CMAPS[kind], vmin=result.p_corrupt)
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(labels))])
    ax.set_yticklabels(labels)
    _layer_ticks(ax, scores.shape[1])
    what = "state" if kind == "hidden" else KIND_NAMES[kind]
    ax.set_title(f"Impact of restoring {what} after corrupted input\nTE = {result.total_effect:.3f}"
                 f" (p={result.p_clean:.3f}, p*={result.p_corrupt:.3f})", fontsize=9)
    ax.set_xlabel(_xlabel(kind, result.window, model_name), fontsize=8)
    cb = fig.colorbar(h)
    cb.ax.set_title(f"p({result.answer.strip()})", y=-0.12, fontsize=8)
    return _save(fig, path)


def plot_average_heatmap(avg: Mapping, kind: str, path: str | os.PathLike, model_name: str = "the model",
                         window: int = 10, vmax: float | None = None) -> Path:
    """Average IE per token group x layer (the paper's rollup figure), clipped at 0."""
    import numpy as np

    m = np.stack([avg[kind][g]["mean"].numpy() for g in GROUPS]).clip(0, None)
    fig, ax = plt.subplots(figsize=(4.5, 2.2), dpi=150)
    h = ax.pcolor(np.nan_to_num(m), cmap=CMAPS[kind], vmin=0.0, vmax=vmax)
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(GROUPS))])
    ax.set_yticklabels([GROUP_LABELS[g] for g in GROUPS], fontsize=8)
    _layer_ticks(ax, m.shape[1])
    what = {"hidden": "Indirect Effect of $h_i^{(l)}$", "mlp": "Indirect Effect of MLP", "attn": "Indirect Effect of Attn"}
    ax.set_title(f"Avg {what[kind]} over {avg['n_facts']} prompts (avg TE {avg['total_effect']:.3f})", fontsize=9)
    ax.set_xlabel(_xlabel(kind, window, model_name), fontsize=8)
    cb = fig.colorbar(h)
    cb.ax.set_title("AIE", y=-0.14, fontsize=8)
    return _save(fig, path)


def plot_average_lines(avg: Mapping, path: str | os.PathLike, kinds: Sequence[str] = ("hidden", "mlp", "attn"),
                       groups: Sequence[str] = GROUPS, model_name: str = "the model", window: int = 10) -> Path:
    """Average IE by layer, one panel per kind, one line per token group, 95% interval shaded."""
    cmap = plt.get_cmap("tab10")
    kinds = [k for k in kinds if k in avg]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.3 * len(kinds), 3.3), sharey=True, dpi=150, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, g in enumerate(groups):
            d = avg[kind][g]
            if d["n"] == 0:
                continue
            y, err = d["mean"].numpy(), 1.96 * d["std"].numpy() / math.sqrt(max(d["n"], 1))
            x = range(len(y))
            c = cmap.colors[GROUPS.index(g)]
            ax.fill_between(x, y - err, y + err, alpha=0.25, color=c)
            ax.plot(x, y, label=GROUP_LABELS[g], color=c)
        what = ("single hidden vector" if kind == "hidden" else f"single {KIND_NAMES[kind]} layer" if window == 1
                else f"run of {window} {KIND_NAMES[kind]} layers")
        ax.set_title(f"Avg indirect effect of a {what}", fontsize=9)
        ax.set_xlabel(f"layer number in {model_name}", fontsize=8)
    axes[0][0].set_ylabel("average indirect effect on p(o)", fontsize=8)
    axes[0][-1].legend(frameon=False, fontsize=7)
    fig.suptitle(f"{model_name}: {avg['n_facts']} facts, avg TE {avg['total_effect']:.3f}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
