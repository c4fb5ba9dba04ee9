#!/usr/bin/env python3
"""What cake_llm_eval --trace printed, summed up: for the needles the full cache
found, per configuration, how the key sat in the cache and how the answers missed.

  scripts/llm_eval_trace.py eval.log              # every layer's line, then per method
  scripts/llm_eval_trace.py eval.log --layer 20   # the conditional table for layer 20

Reads the trace lines (`trace context S trial T key K tokens [a, b): full "..." found`,
then one line per configuration with the KV-head rows of each layer holding every
token of the key after the prefill and after decoding, and its answer). Prints:
  - per configuration: found / missed with an answer whose first number starts with
    the key's first two digits / missed otherwise; the share of rows holding the whole
    key over all layers, for the misses and the finds, after the prefill and after
    decoding; the layers per prompt where decoding changed the rows;
  - per layer, all configurations pooled: the (configuration, prompt) pairs in which
    some row lacks part of the key at the end of decoding, and how many of them found
    the needle;
  - with --layer L: per configuration, the prompts in which every row of layer L holds
    the whole key after the prefill (and how many found the needle), and the others.
"""
import argparse
import json
import re
import sys

HEAD = re.compile(r'^trace context \d+ trial (\d+) key (\d+) tokens \[(-?\d+), (-?\d+)\): full ".*" (found|missed)$')
LINE = re.compile(r'^  (\S+)\s+(\S+)\s+key rows per layer: prefill ([0-9,]*) decoded ([0-9,]*)\s+"(.*)"$')
MODEL = re.compile(r'^model .*: \d+ layers, \d+/(\d+) heads')


def rows(s):
    """One count per layer: digits, or comma-separated counts (more than 9 KV heads)."""
    return [int(x) for x in s.split(",") if x] if "," in s else [int(c) for c in s]


def unescape(s):
    """The eval writes answers JSON-escaped (one line each)."""
    try:
        return json.loads('"' + s + '"')
    except ValueError:
        return s


def parse(path):
    """The traced prompts (key, full cache found it, {config: (prefill rows, decoded
    rows, answer)}) and the KV heads the model line names (None if absent). A config
    line belongs to the header just before it; anything else resets that."""
    prompts, kv_heads, current = [], None, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\r\n")
            m = MODEL.match(line)
            if m:
                kv_heads = int(m.group(1))
                continue
            m = HEAD.match(line)
            if m:
                current = (m.group(2), m.group(5) == "found", {}, int(m.group(3)) >= 0)
                prompts.append(current)
                continue
            m = LINE.match(line)
            if m and current is not None:
                cfg = m.group(1) + " " + m.group(2)
                current[2][cfg] = (rows(m.group(3)), rows(m.group(4)), unescape(m.group(5)))
                continue
            current = None
    return prompts, kv_heads


def heads(prompts):
    """Without the model line: the largest count any line shows (the window's rows
    hold every token that falls in it, so a needle in the window shows the full count)."""
    return max((max(r[0] + r[1]) for p in prompts for r in p[2].values() if r[0]), default=1)


def starts_like(answer, key):
    m = re.search(r"[0-9]+", answer)
    return bool(m) and len(m.group(0)) >= 2 and m.group(0)[:2] == key[:2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("--layer", type=int, default=None)
    a = ap.parse_args()
    prompts, kv_heads = parse(a.log)
    # The needles the full cache found whose key was located (rows traced), with every
    # configuration's line (the first such prompt names them).
    located = [p for p in prompts if p[1] and p[3] and p[2]]
    cfgs = list(located[0][2].keys()) if located else []
    found_full = [p for p in located if all(c in p[2] and p[2][c][0] for c in cfgs)]
    if not found_full:
        sys.exit("no traced prompt whose needle the full cache found in " + a.log)
    H = kv_heads or heads(prompts)
    layers = len(next(iter(found_full[0][2].values()))[0])
    print(f"{len(prompts)} traced prompts, {len(found_full)} whose needle the full cache found; "
          f"{layers} layers, {H} KV heads\n")

    print("| configuration | found | missed, starts like the key | missed otherwise | whole key, "
          "misses: prefill / decoded | whole key, finds: prefill / decoded | layers changed by "
          "decoding, per prompt |")
    print("|---|---|---|---|---|---|---|")
    for c in cfgs:
        n = {"found": 0, "starts": 0, "other": 0}
        share = {"miss": [0.0, 0.0, 0], "find": [0.0, 0.0, 0]}
        changed = 0
        for key, _, by, _ in found_full:
            pre, dec, ans = by[c]
            ok = key in ans
            n["found" if ok else ("starts" if starts_like(ans, key) else "other")] += 1
            s = share["find" if ok else "miss"]
            s[0] += sum(pre) / (H * len(pre))
            s[1] += sum(dec) / (H * len(dec))
            s[2] += 1
            changed += sum(x != y for x, y in zip(pre, dec))

        def pct(s):
            return f"{100 * s[0] / s[2]:.1f}% / {100 * s[1] / s[2]:.1f}%" if s[2] else "-"

        print(f"| {c} | {n['found']} | {n['starts']} | {n['other']} | {pct(share['miss'])} | "
              f"{pct(share['find'])} | {changed / len(found_full):.2f} |")

    print("\nper layer, every configuration pooled: pairs in which some row lacks part of the "
          "key after decoding, and how many found the needle")
    print("| layer | pairs | found | share found |")
    print("|---|---|---|---|")
    for l in range(layers):
        pairs = hit = 0
        for key, _, by, _ in found_full:
            for c in cfgs:
                _, dec, ans = by[c]
                if dec[l] < H:
                    pairs += 1
                    hit += key in ans
        print(f"| {l} | {pairs} | {hit} | {hit / pairs:.2f} |" if pairs else f"| {l} | 0 | 0 | - |")

    if a.layer is not None:
        L = a.layer
        print(f"\nlayer {L}: prompts in which every row holds the whole key after the prefill "
              "(found), and the others (found)")
        print("| configuration | held | found | not held | found |")
        print("|---|---|---|---|---|")
        for c in cfgs:
            held = [key in by[c][2] for key, _, by, _ in found_full if by[c][0][L] == H]
            rest = [key in by[c][2] for key, _, by, _ in found_full if by[c][0][L] < H]
            print(f"| {c} | {len(held)} | {sum(held)} | {len(rest)} | {sum(rest)} |")


if __name__ == "__main__":
    main()
