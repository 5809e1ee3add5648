"""The fact-tracing table of several influence runs (their influence_summary.json), beside FTRACE-TREx.

`python -m kedit_pl.locate.influence.report RUN_DIR [RUN_DIR ...] [--out table.md]`
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Akyürek et al. (2022), FTRACE-TREx, fine-tune-learned queries, mean over seeds (MRR, R@10 in percent)
FTRACE_TREX = {"BM25": (77.55, 60.89), "TracIn (fine-tuned)": (48.56, 56.02), "TracIn (pre-trained)": (62.38, 57.54),
               "Embed (fine-tuned)": (64.29, 57.89)}
SLICES = ("all", "no_verbatim", "finetune_learned", "finetune_learned_no_verbatim")


def table(runs: list[Path], k: int = 10) -> str:
    """The Markdown tables of the runs' metrics, slice by slice, beside FTRACE-TREx."""
    rows = [json.loads((r / "influence_summary.json").read_text()) for r in runs]
    lines = []
    for sl in SLICES:
        have = [r for r in rows if sl in r["metrics"]]
        if not have:
            continue
        n = have[0]["metrics"][sl]["n_queries"]
        lines += [f"**{sl}** ({n} queries)", "", f"| method | MRR | R@{k} | P@{k} |", "|---|---|---|---|"]
        for r in have:
            m = r["metrics"][sl]
            lines.append(f"| {r['method']} | {m['mrr']:.1f} | {m[f'r@{k}']:.1f} | {m[f'p@{k}']:.1f} |")
        lines.append("")
    lines += ["FTRACE-TREx (Akyürek et al. 2022), for reference:", "", "| method | MRR | R@10 |", "|---|---|---|"]
    lines += [f"| {m} | {a:.1f} | {b:.1f} |" for m, (a, b) in FTRACE_TREX.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print (or write with `--out`) the table of the given run folders."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    text = table(a.runs)
    if a.out:
        from kedit_pl.io import write_text

        write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
