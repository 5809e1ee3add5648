"""The edit-layer sweep as the ROME paper draws it (Meng et al. 2022, Fig. "edit layer"): ES / PS / NS of ROME
against the edited layer, beside the causal-tracing curve (MLP indirect effect at the last subject token).

Run the sweep as a joblib-launched Hydra multirun, trace the model, then draw:

    python edit.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 method=rome dataset.split=dev dataset.limit=30 \
        method.layer=0,1,2,3,4,5,6,7,8,9,13,17,21,25,29 hydra.sweep.dir=runs/layer_sweep
    python -m kedit_pl.sweep_test runs/layer_sweep --limit 200        # the best layer, once, on test records
    python locate.py locate=causal_trace locate.n_records=20 locate.n_samples=5 hydra.run.dir=runs/trace
    python bench/layer_sweep.py runs/layer_sweep --trace runs/trace/average.json --out docs/figures/rome_layer_sweep

Writes <out>.png, <out>.md and <out>.csv: one row per layer (ES, PS, NS, Score, NS cost = pre NS − post NS,
s/edit) and the tracing curve's value at that layer.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from kedit_pl.io import read_json, write_text

METRICS = ("es", "ps", "ns", "score")


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per finished run of the sweep: its edit layer and its pre/post metrics."""
    rows = []
    for path in sorted(sweep_dir.rglob("summary.json")):
        s = read_json(path)
        layer = (s.get("run", {}).get("config") or {}).get("layer")
        if layer is None:
            print(f"skipping {path}: no method.layer in its config", file=sys.stderr)
            continue
        rows.append({"layer": int(layer), "n": int(s["post"].get("n_records", 0)),
                     **{m: s["post"][m] for m in METRICS}, "pre_ns": s["pre"]["ns"],
                     "ns_cost": s["pre"]["ns"] - s["post"]["ns"], "s_per_edit": s["timing"]["seconds_per_edit"],
                     "ci": (s.get("ci") or {}).get("post") or {},  # 95 % bootstrap intervals, where recorded
                     "run": str(path.parent)})
    layers = [r["layer"] for r in rows]
    if len(set(layers)) != len(layers):
        raise SystemExit(f"error: several runs edit the same layer under {sweep_dir}: {sorted(layers)}")
    return sorted(rows, key=lambda r: r["layer"])


def trace_curve(path: Path | None) -> list[float] | None:
    """Average indirect effect of the MLP at the last subject token, per layer (locate=causal_trace)."""
    if path is None:
        return None
    return [float(x) for x in read_json(path)["mlp"]["last_subject"]["mean"]]


def plot(rows: list[dict], aie: list[float] | None, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    layers = [r["layer"] for r in rows]
    for m, style in zip(("es", "ps", "ns"), ("o-", "s-", "^-")):
        (line,) = ax.plot(layers, [r[m] for r in rows], style, label=m.upper())
        if all(m in r["ci"] for r in rows):  # the 95 % bootstrap band over records
            ax.fill_between(layers, [r["ci"][m][0] for r in rows], [r["ci"][m][1] for r in rows],
                            color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(rows[0]["pre_ns"], color="gray", ls=":", lw=1, label="NS unedited")
    ax.set_xlabel("edited layer")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 102)
    if aie is not None:
        ax2 = ax.twinx()
        ax2.plot(range(len(aie)), aie, color="tab:red", alpha=0.6, lw=2, label="causal trace: MLP AIE (last subject)")
        ax2.set_ylabel("average indirect effect", color="tab:red")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="lower left", fontsize=8, ncol=4)
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def table(rows: list[dict], aie: list[float] | None) -> tuple[str, str]:
    head = ["layer", "ES", "PS", "NS", "Score", "NS cost", "s/edit", "MLP AIE (trace)", "records"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "es", "ps", "ns", "score", "ns_cost", "s_per_edit", "mlp_aie", "n"])
    for r in rows:
        a = aie[r["layer"]] if aie is not None and r["layer"] < len(aie) else None
        ci = lambda m: f" [{r['ci'][m][0]:.1f}, {r['ci'][m][1]:.1f}]" if m in r["ci"] else ""  # noqa: E731
        cells = [r["layer"], *(f"{r[m]:.1f}{ci(m)}" for m in METRICS), f"{r['ns_cost']:.1f}", f"{r['s_per_edit']:.1f}",
                 "" if a is None else f"{a:.3f}", r["n"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
        w.writerow([r["layer"], *(round(r[m], 2) for m in METRICS), round(r["ns_cost"], 2),
                    round(r["s_per_edit"], 2), "" if a is None else round(a, 4), r["n"]])
    return "\n".join(lines) + "\n", buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path, help="the multirun folder (hydra.sweep.dir) of the layer sweep")
    ap.add_argument("--trace", type=Path, default=None, help="average.json of locate=causal_trace on the same model")
    ap.add_argument("--out", type=Path, default=Path("docs/figures/rome_layer_sweep"), help="path stem of the outputs")
    ap.add_argument("--title", default="ROME: edit layer vs. ES / PS / NS (smollm2_135m)")
    a = ap.parse_args(argv)
    rows = sweep_rows(a.sweep_dir)
    if not rows:
        raise SystemExit(f"error: no finished runs (summary.json) under {a.sweep_dir}")
    aie = trace_curve(a.trace)
    plot(rows, aie, a.out.with_suffix(".png"), a.title)
    md, csv_text = table(rows, aie)
    write_text(a.out.with_suffix(".md"), md)
    write_text(a.out.with_suffix(".csv"), csv_text)
    print(md)


if __name__ == "__main__":
    main()
