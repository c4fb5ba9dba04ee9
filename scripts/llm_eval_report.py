#!/usr/bin/env python3
"""Markdown tables from cake_llm_eval's JSON (--json): per context, needle found and
next-token agreement with their 95% intervals (agreement's by prompt), the column's
best in bold, and which methods each column's best is apart from.

  scripts/llm_eval_report.py build-llm/llm-eval.json > tables.md
  scripts/llm_eval_report.py eval_1024.json eval_2048.json   # one table, a column per cell
"""
import json
import sys


def fmt(p, ci, digits=0):
    f = "%%.%df" % digits
    return (f % (100 * p)) + " [" + (f % (100 * ci[0])) + ", " + (f % (100 * ci[1])) + "]"


def apart(a, b):
    return a[1] < b[0] or b[1] < a[0]


def main(paths):
    rows = [r for path in paths for r in json.load(open(path))["summary"]]
    contexts = sorted({r["context"] for r in rows})
    caches = []
    methods = []
    for r in rows:
        if r["cache"] not in caches:
            caches.append(r["cache"])
        if r["method"] not in methods:
            methods.append(r["method"])
    cell = {(r["context"], r["method"], r["cache"]): r for r in rows}
    for c in contexts:
        r = next(r for r in rows if r["context"] == c)
        print("context %d: the full cache finds %d/%d needles\n" % (c, r["full_found"], r["needles"]))
    cols = [(c, s) for c in contexts for s in caches if any((c, m, s) in cell for m in methods)]

    def label(c, s):
        # a context clamped just under the model's limit (8170 of 8192) still reads "8K"
        k = round(c / 1024)
        near = k > 0 and abs(c - 1024 * k) <= c // 100
        return "%dK, C = %s" % (k, s) if near else "%d, C = %s" % (c, s)
    for measure, key_p, key_ci, digits in (
        ("needle found, % [95% CI]", "found", "found_ci95", 0),
        ("next-token agreement with the full cache, % [95% CI by prompt]", "agree", "agreement_ci95", 1),
    ):
        print("**%s**\n" % measure)
        print("| method | " + " | ".join(label(c, s) for c, s in cols) + " |")
        print("|---|" + "---|" * len(cols))
        best = {}
        for c, s in cols:
            # the first method with the highest rate, as the tool's verdicts pick it
            for m in methods:
                r = cell.get((c, m, s))
                if not r:
                    continue
                v = r[key_p] / (r["needles"] if key_p == "found" else r["steps"])
                if (c, s) not in best or v > best_v:
                    best[(c, s)], best_v = m, v
        for m in methods:
            out = []
            for c, s in cols:
                r = cell.get((c, m, s))
                if not r:
                    out.append("-")
                    continue
                n = r["needles"] if key_p == "found" else r["steps"]
                t = fmt(r[key_p] / n, r[key_ci], digits)
                out.append("**" + t + "**" if best[(c, s)] == m else t)
            print("| %s | %s |" % (m, " | ".join(out)))
        print()
        for c, s in cols:
            b = cell[(c, best[(c, s)], s)]
            ap = [m for m in methods if m != best[(c, s)] and (c, m, s) in cell and apart(b[key_ci], cell[(c, m, s)][key_ci])]
            print("- %s: best %s, apart from %s" % (label(c, s), best[(c, s)], ", ".join(ap) if ap else "none"))
        print()
    if any("agreement_effective_steps" in r for r in rows):
        eff = [r["agreement_effective_steps"] / r["steps"] for r in rows]
        widen = [(r["agreement_ci95"][1] - r["agreement_ci95"][0]) / max(1e-12, r["agreement_ci95_iid"][1] - r["agreement_ci95_iid"][0]) for r in rows]
        print("agreement's effective steps: %.0f%%-%.0f%% of the steps counted (median %.0f%%); intervals %.1f-%.1f times the per-step ones" % (
            100 * min(eff), 100 * max(eff), 100 * sorted(eff)[len(eff) // 2], min(widen), max(widen)))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: llm_eval_report.py EVAL.json [EVAL.json ...]")
    main(sys.argv[1:])
