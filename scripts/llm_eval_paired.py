#!/usr/bin/env python3
"""Two cake_llm_eval runs (--json) compared prompt by prompt: for each pair of
configs, on the prompts both runs hold (the same context, depth, filler and key),
the change in next-token agreement with a paired 95% interval (Student t on the
per-prompt differences), and the needles found by one run only with McNemar's exact
test. A paired comparison sees what two overlapping intervals hide: an
intervention run on a third of the prompts (--trials 33 makes the first 33 of the
110) against the full run's same prompts.

  scripts/llm_eval_paired.py base.json changed.json                # every config in both
  scripts/llm_eval_paired.py base.json changed.json --pair cake/20%
  scripts/llm_eval_paired.py run.json run.json --pair snapkv/20%=cake/20%   # two methods of one run
  scripts/llm_eval_paired.py run.json --against cake   # every method against cake, per cache
  scripts/llm_eval_paired.py run.json --against cake --level 0.99875   # 95% over 40 cells (Bonferroni)
"""
import json
import math
import sys


def _betacf(a, b, x):
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) +
                     a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast on the side of the mean; the other side by symmetry
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The p quantile (p > 0.5) of Student's t with df degrees of freedom, by bisection."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(diffs, level=0.95):
    """Mean of the paired differences and its Student t interval."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:  # one prompt says nothing of the spread
        return mean, (-math.inf, math.inf)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def mcnemar_exact(only_a, only_b):
    """Two-sided exact McNemar p: the discordant pairs as a fair binomial."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def load(path):
    d = json.load(open(path))
    labels = ["%s/%s" % (m, c) for m, c in d["configs"]]
    runs = {}
    for r in d["runs"]:
        runs[(r["context"], r["depth"], r["filler"], r["key"])] = r
    return labels, runs, d["steps"]


def rate(side, keys, what):
    """A config's mean over keys: agreement (a share of its steps) or needles found."""
    runs, i, steps = side
    return sum(runs[k][what][i] / (steps if what == "agree" else 1) for k in keys) / len(keys)


def paired(a, b, keys, level=0.95):
    """Config b against config a (each (runs, config index, steps)) on the prompts keys:
    the mean per-prompt agreement difference b - a and its interval, and the needles
    found by a only and by b only."""
    (ra, ia, sa), (rb, ib, sb) = a, b
    mean, ci = mean_ci([rb[k]["agree"][ib] / sb - ra[k]["agree"][ia] / sa for k in keys], level)
    only_a = sum(bool(ra[k]["found"][ia]) and not rb[k]["found"][ib] for k in keys)
    only_b = sum(bool(rb[k]["found"][ib]) and not ra[k]["found"][ia] for k in keys)
    return mean, ci, only_a, only_b


def compare(a_path, b_path, pairs, level=0.95):
    labels_a, runs_a, steps_a = load(a_path)
    labels_b, runs_b, steps_b = load(b_path)
    if not pairs:
        pairs = [(x, x) for x in labels_a if x in labels_b]
        if not pairs:
            sys.exit("no config is in both runs; name pairs with --pair A_CONFIG=B_CONFIG")
    shared = [k for k in runs_a if k in runs_b]
    print("%s (A) against %s (B): %d prompts in both (A has %d, B %d); agreement over %d / %d steps a prompt" % (
        a_path, b_path, len(shared), len(runs_a), len(runs_b), steps_a, steps_b))
    if not shared:
        sys.exit("the runs share no prompt (context, depth, filler and key)")
    print()
    print("| A | B | agreement A | agreement B | B - A, points [%g%% CI, paired t] | needles A | needles B | A only / B only | McNemar p |" % (100 * level))
    print("|---|---|---|---|---|---|---|---|---|")
    for ca, cb in pairs:
        for label, labels, path in ((ca, labels_a, a_path), (cb, labels_b, b_path)):
            if label not in labels:
                sys.exit("%s has no config %s (it has %s)" % (path, label, ", ".join(labels)))
        ia, ib = labels_a.index(ca), labels_b.index(cb)
        a, b = (runs_a, ia, steps_a), (runs_b, ib, steps_b)
        mean, (lo, hi), only_a, only_b = paired(a, b, shared, level)
        print("| %s | %s | %.1f | %.1f | %+.1f [%+.1f, %+.1f]%s | %.0f | %.0f | %d / %d | %.3g |" % (
            ca, cb, 100 * rate(a, shared, "agree"), 100 * rate(b, shared, "agree"),
            100 * mean, 100 * lo, 100 * hi, " apart" if lo > 0 or hi < 0 else "",
            rate(a, shared, "found") * len(shared), rate(b, shared, "found") * len(shared),
            only_a, only_b, mcnemar_exact(only_a, only_b)))




def against(path, base, level=0.95):
    """A matrix: every method against base at each cache of one run."""
    labels, runs, steps = load(path)
    configs = json.load(open(path))["configs"]
    caches, methods = [], []
    for m, c in configs:
        caches += [c] if c not in caches else []
        methods += [m] if m not in methods and m != base else []
    if base not in {m for m, _ in configs}:
        sys.exit("%s has no method %s (it has %s)" % (path, base, ", ".join(methods)))
    keys = list(runs)
    print("%s: each method's agreement minus %s's, points, prompt by prompt (%d prompts); "
          "* its %g%% interval (paired t) excludes 0; needles: found by the method only / by %s only, "
          "shown where McNemar's exact p < %g" % (path, base, len(keys), 100 * level, base, 1 - level))
    print()
    print("| cache | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for c in caches:
        if "%s/%s" % (base, c) not in labels:
            continue
        i = labels.index("%s/%s" % (base, c))
        out = []
        for m in methods:
            if "%s/%s" % (m, c) not in labels:
                out.append("-")
                continue
            j = labels.index("%s/%s" % (m, c))
            mean, (lo, hi), only_base, only_m = paired((runs, i, steps), (runs, j, steps), keys, level)
            cell = "%+.1f%s" % (100 * mean, "*" if lo > 0 or hi < 0 else "")
            if mcnemar_exact(only_m, only_base) < 1 - level:
                cell += " (%d/%d)" % (only_m, only_base)
            out.append(cell)
        print("| %s | %s |" % (c, " | ".join(out)))


def main(argv):
    paths, pairs, base, level = [], [], None, 0.95
    it = iter(argv)
    for arg in it:
        if arg == "--against":
            base = next(it, None)
            if base is None:
                sys.exit("--against needs a method")
        elif arg == "--level":
            level = float(next(it, "nan"))
            if not 0.5 < level < 1:
                sys.exit("--level needs a confidence level between 0.5 and 1 (0.95: 95%)")
        elif arg == "--pair":
            spec = next(it, None)
            if spec is None:
                sys.exit("--pair needs METHOD/CACHE or A_CONFIG=B_CONFIG")
            a, _, b = spec.partition("=")
            pairs.append((a, b or a))
        else:
            paths.append(arg)
    if base is not None:
        if len(paths) != 1 or pairs:
            sys.exit("usage: llm_eval_paired.py RUN.json --against METHOD [--level 0.95]")
        return against(paths[0], base, level)
    if len(paths) != 2:
        sys.exit("usage: llm_eval_paired.py A.json B.json [--pair METHOD/CACHE[=METHOD/CACHE]] ... [--level 0.95]")
    compare(paths[0], paths[1], pairs, level)


if __name__ == "__main__":
    main(sys.argv[1:])
