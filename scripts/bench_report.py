#!/usr/bin/env python3
"""Turn cake_bench's Google Benchmark JSON into a Markdown table and an SVG chart.

    python3 scripts/bench_report.py bench/results/bench_host.json [--out-dir DIR] [--machine TEXT]

Benchmarks are named <operation>/<implementation>/<arguments>; "cake" is ours, every
other implementation is a baseline measured in the same run. For every operation
and argument set the table shows cake's time, each baseline's time and the ratio
baseline / cake (above 1: cake is faster). Standard library only.
"""

import argparse
import html
import json
import math
import os
import sys
from collections import OrderedDict

# Google Benchmark adds these to a name; they are not part of our arguments.
SUFFIX_KEYS = ("min_time:", "iterations:", "repeats:", "threads:")
SUFFIX_WORDS = ("real_time", "process_time", "manual_time")
UNIT_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}

# The targets on the host: (operation, args, baseline, minimum ratio baseline/cake).
TARGETS = [
    ("prefill_layer", "llama3.1-8b/B:1/S:16384/C:1024", "naive", 15.0,
     "whole-layer prefill eviction, S = 16K, Llama-3.1-8B heads: >= 15x the naive route"),
    ("prefill_layer", "llama3.1-8b/B:1/S:16384/C:1024", "torch_reference", 20.0,
     "whole-layer prefill eviction, S = 16K: >= 20x the reference's PyTorch route "
     "(scripts/reference-bench, when PyTorch is installed)"),
    ("window_stats", "llama3.1-8b/B:1/S:16384", "naive", 15.0,
     "window statistics, S = 16K, Llama-3.1-8B heads: >= 15x the naive route"),
    ("select_k", "rows:8/n:32768/k:1024", "std_sort", 10.0,
     "top-k of 8 rows x 32K, k = 1024: >= 10x full sort"),
    ("select_k", "rows:8/n:32768/k:1024", "std_nth_element", 1.0,
     "top-k of 8 rows x 32K, k = 1024: faster than std::nth_element"),
    ("compact", "llama3.1-8b/B:1/S:32768/m:1024", "memcpy", 0.6,
     "compaction at >= 60% of the memcpy bandwidth (same bytes)"),
]


def split_name(name):
    parts = name.split("/")
    while parts and (parts[-1] in SUFFIX_WORDS or parts[-1].startswith(SUFFIX_KEYS)):
        parts.pop()
    if len(parts) < 2:
        return None
    return parts[0], parts[1], "/".join(parts[2:])


def fmt_time(ns):
    if ns >= 1e9:
        return "%.2f s" % (ns / 1e9)
    if ns >= 1e6:
        return "%.2f ms" % (ns / 1e6)
    if ns >= 1e3:
        return "%.1f us" % (ns / 1e3)
    return "%.0f ns" % ns


def fmt_ratio(r):
    if r >= 100:
        return "%.0fx" % r
    if r >= 10:
        return "%.1fx" % r
    return "%.2fx" % r


def load(path):
    with open(path) as f:
        data = json.load(f)
    ops = OrderedDict()  # op -> OrderedDict(args -> {impl: run})
    impls = OrderedDict()  # op -> [baseline impls in order of appearance]
    for b in data.get("benchmarks", []):
        # With --benchmark_repetitions the median repetition is kept (robust to
        # other work on a shared machine in both directions); aggregates are not used.
        if b.get("run_type") == "aggregate":
            continue
        if "error_occurred" in b and b["error_occurred"]:
            continue
        parsed = split_name(b.get("run_name", b["name"]))
        if not parsed:
            continue
        op, impl, args = parsed
        t = float(b["real_time"]) * UNIT_NS.get(b.get("time_unit", "ns"), 1.0)
        run = {"time_ns": t, "bw_fraction": b.get("bw_fraction"),
               "bytes_per_second": b.get("bytes_per_second"),
               "items_per_second": b.get("items_per_second"),
               "peak_tokens": b.get("peak_tokens"), "GFLOPS": b.get("GFLOPS"),
               "fma_peak_fraction": b.get("fma_peak_fraction")}
        cases = ops.setdefault(op, OrderedDict())
        slot = cases.setdefault(args, {})
        slot.setdefault(impl, []).append(run)
        if impl != "cake":
            lst = impls.setdefault(op, [])
            if impl not in lst:
                lst.append(impl)
    for cases in ops.values():
        for slot in cases.values():
            for impl, runs in slot.items():
                runs.sort(key=lambda r: r["time_ns"])
                slot[impl] = runs[(len(runs) - 1) // 2]  # the median (lower of the middle two)
    return data.get("context", {}), ops, impls


def ratios(ops, impls):
    """[(op, args, baseline, ratio)] for every case with cake and that baseline."""
    out = []
    for op, cases in ops.items():
        for args, slot in cases.items():
            if "cake" not in slot:
                continue
            for impl in impls.get(op, []):
                if impl in slot:
                    out.append((op, args, impl, slot[impl]["time_ns"] / slot["cake"]["time_ns"]))
    return out


def markdown(context, ops, impls, machine):
    lines = ["# cake host benchmarks", ""]
    cpu = machine or "unknown CPU"
    lines.append("Machine: **%s**; %s CPUs at %s MHz reported by Google Benchmark; "
                 "measured memcpy bandwidth %s GB/s (read + write); matrix: %s; run %s."
                 % (cpu, context.get("num_cpus", "?"), context.get("mhz_per_cpu", "?"),
                    context.get("cake.memcpy_bandwidth_GBps", "?")[:5],
                    context.get("cake.matrix", "?"), context.get("date", "?")))
    lines.append("")
    reps = context.get("cake.repetitions", "1")
    lines.append("Ratio = baseline time / cake time (above 1: cake is faster). Every "
                 "implementation uses the same threads; times are wall-clock, the median of "
                 "%s repetition(s). Host kernel path: %s; single-precision FMA peak of these "
                 "threads: %s GFLOP/s (measured at start-up)."
                 % (reps, context.get("cake.host_isa", "?"),
                    context.get("cake.fma_peak_GFLOPS", "?")[:6]))
    lines.append("")
    # Targets first.
    lines.append("## Targets")
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    for op, args, base, need, text in TARGETS:
        slot = ops.get(op, {}).get(args, {})
        if "cake" in slot and base in slot:
            r = slot[base]["time_ns"] / slot["cake"]["time_ns"]
            shown = ("%.0f%% of memcpy" % (100 * r)) if op == "compact" else fmt_ratio(r)
            lines.append("| %s | %s | %s |" % (text, shown, "yes" if r >= need and (need != 1.0 or r > 1.0) else "**no**"))
        else:
            lines.append("| %s | not run | - |" % text)
    lines.append("")
    for op, cases in ops.items():
        bases = impls.get(op, [])
        lines.append("## %s" % op)
        lines.append("")
        head = ["args", "cake"]
        extra = None
        if any(slot.get("cake", {}).get("bw_fraction") is not None for slot in cases.values()):
            extra = "bw_fraction"
        elif any(slot.get("cake", {}).get("GFLOPS") is not None for slot in cases.values()):
            extra = "GFLOPS"
        elif any(slot.get("cake", {}).get("peak_tokens") is not None for slot in cases.values()):
            extra = "peak_tokens"
        peak = extra == "GFLOPS" and any(
            slot.get("cake", {}).get("fma_peak_fraction") is not None for slot in cases.values())
        if extra:
            head.append("cake " + extra)
        if peak:
            head.append("cake share of FMA peak")
        for b in bases:
            head += [b, "%s / cake" % b]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for args, slot in cases.items():
            row = [args.replace("|", "\\|")]
            c = slot.get("cake")
            row.append(fmt_time(c["time_ns"]) if c else "-")
            if extra:
                v = c.get(extra) if c else None
                row.append(("%.2f" % v if extra != "peak_tokens" else "%d" % v) if v is not None else "-")
            if peak:
                v = c.get("fma_peak_fraction") if c else None
                row.append("%.0f%%" % (100 * v) if v is not None else "-")
            for b in bases:
                r = slot.get(b)
                if r is None:
                    row += ["-", "-"]
                    continue
                cell = fmt_time(r["time_ns"])
                if extra == "peak_tokens" and r.get("peak_tokens") is not None:
                    cell += " (peak %d)" % r["peak_tokens"]
                row.append(cell)
                row.append(fmt_ratio(r["time_ns"] / c["time_ns"]) if c else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac"]


def svg(rs, machine):
    """Horizontal bars of baseline/cake on a log axis, one per (operation, args, baseline)."""
    if not rs:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40">' \
               '<text x="10" y="25">no ratios</text></svg>\n'
    bar_h, gap, label_w, plot_w, top, right = 14, 4, 460, 520, 60, 70
    lo = min(0.5, min(r for *_, r in rs) / 1.5)
    hi = max(20.0, max(r for *_, r in rs) * 1.5)
    l0, l1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))

    def x(v):
        return label_w + (math.log10(v) - l0) / (l1 - l0) * plot_w

    height = top + len(rs) * (bar_h + gap) + 40
    width = label_w + plot_w + right
    bases = []
    for *_, b, _r in rs:
        if b not in bases:
            bases.append(b)
    colour = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(bases)}
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="Helvetica,Arial,sans-serif" font-size="11">' % (width, height),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="%d" y="18" font-size="14" font-weight="bold">cake vs baselines: '
           'baseline time / cake time (log scale; right of 1 = cake faster)</text>' % 10,
           '<text x="10" y="34" fill="#555">%s</text>' % html.escape(machine or "")]
    # legend
    lx = 10
    for b in bases:
        out.append('<rect x="%d" y="42" width="10" height="10" fill="%s"/>' % (lx, colour[b]))
        out.append('<text x="%d" y="51">%s</text>' % (lx + 14, html.escape(b)))
        lx += 24 + 7 * len(b)
    # grid
    for e in range(l0, l1 + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if v < 10 ** l0 or v > 10 ** l1:
                continue
            gx = x(v)
            strong = m == 1
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="%s"/>'
                       % (gx, top - 4, gx, height - 30, "#999" if strong else "#ddd",
                          "1" if strong else "0.5"))
            if strong or m == 5:
                lab = ("%g" % v) + "x"
                out.append('<text x="%.1f" y="%d" text-anchor="middle" fill="#333">%s</text>'
                           % (gx, height - 16, lab))
    out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black" stroke-width="1.5"/>'
               % (x(1), top - 4, x(1), height - 30))
    y = top
    for op, args, b, r in rs:
        label = "%s  %s  vs %s" % (op, args, b)
        out.append('<text x="%d" y="%d" text-anchor="end">%s</text>'
                   % (label_w - 6, y + bar_h - 3, html.escape(label)))
        x0, x1 = x(1), x(r)
        out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"><title>%s: %s</title></rect>'
                   % (min(x0, x1), y, max(abs(x1 - x0), 1), bar_h, colour[b], html.escape(label),
                      fmt_ratio(r)))
        out.append('<text x="%.1f" y="%d" fill="#333">%s</text>'
                   % (max(x0, x1) + 4, y + bar_h - 3, fmt_ratio(r)))
        y += bar_h + gap
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="?", default="bench/results/bench_host.json")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--machine", default=None, help="CPU model and cores (default: lscpu)")
    a = ap.parse_args()
    out_dir = a.out_dir or os.path.dirname(os.path.abspath(a.json))
    machine = a.machine
    if not machine:
        try:
            with open("/proc/cpuinfo") as f:
                model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                             "unknown CPU")
            machine = "%s, %d cores" % (model, os.cpu_count() or 0)
        except OSError:
            machine = "unknown CPU"
    context, ops, impls = load(a.json)
    if not ops:
        print("bench_report: no benchmarks in %s" % a.json, file=sys.stderr)
        return 1
    md = markdown(context, ops, impls, machine)
    rs = ratios(ops, impls)
    with open(os.path.join(out_dir, "bench_host.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "bench_host_ratios.svg"), "w") as f:
        f.write(svg(rs, machine))
    # The targets, on the terminal too.
    start = md.index("## Targets")
    end = md.index("\n## ", start + 5)
    print(md[start:end].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
