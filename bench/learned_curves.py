"""Training curves of learned-editor runs (train.py with the CSV logger), one panel per validation metric.

    python bench/learned_curves.py RUN_DIR[=LABEL] ... --out docs/figures/learned_editors_curves.png

Reads each run's csv/version_*/metrics.csv (a resumed run's versions are joined by step) and plots the held-out
validation edits' ES, PS, NS (CounterFact) or loc_kept (zsRE), and edit_success (the selection metric), against
the training step. Prints the best step of each run.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

PANELS = ("val/es", "val/ps", "val/ns", "val/loc_kept", "val/edit_success", "train/loc_loss")


def read_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] over all CSV versions of a run, later versions winning a step."""
    series: dict[str, dict[int, float]] = {}
    for f in sorted(run.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        for row in csv.DictReader(f.open()):
            for k, v in row.items():
                if k != "step" and v not in ("", None):
                    series.setdefault(k, {})[int(row["step"])] = float(v)
    return {k: sorted(v.items()) for k, v in series.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="train run folders, optionally RUN=LABEL")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(r.split("=")[0]), r.split("=", 1)[1] if "=" in r else Path(r).name) for r in args.runs]
    data = [(label, read_metrics(path)) for path, label in runs]
    panels = [p for p in PANELS if any(p in m for _, m in data)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, m in data:
            pts = m.get(panel, [])
            if panel.startswith("train/"):  # smooth the per-step training loss over 20 logged points
                pts = [(s, sum(v for _, v in pts[max(0, i - 19):i + 1]) / len(pts[max(0, i - 19):i + 1]))
                       for i, (s, _) in enumerate(pts)]
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if panel.startswith("val") else None,
                        ms=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    for label, m in data:
        es = m.get("val/edit_success", [])
        if es:
            step, best = max(es, key=lambda x: x[1])
            print(f"{label}: best val/edit_success {best:.1f} at step {step} (last step {es[-1][0]})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
