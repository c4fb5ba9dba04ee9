#!/usr/bin/env python3
"""Two cake_llm_eval runs (--json), or two configs of one, compared prompt by prompt.

On the prompts both runs hold (the same context, depth, filler and key), for each
pair of configs: the mean change in next-token agreement with a paired interval, and
the needles found by one config only with an exact test. Every config of a run
answers the same prompts, so each prompt's own difficulty (most of the width of a
cell's interval) cancels: a paired comparison sees what two overlapping intervals
hide. An intervention run on the first prompts (--trials 33 makes the first 33 of the
110) pairs with the full run's same prompts.

The prompts are not independent: those that share a context, filler text and depth
are the same haystack with another key, and their differences move together. They
are one cluster: the agreement interval is cluster-robust (the per-prompt mean's
standard error from the clusters' summed deviations, Student t with clusters - 1
degrees of freedom), and the needles' test is an exact sign test over the clusters
whose needle count differs between the two configs (McNemar's exact test when every
cluster is one prompt).

  scripts/llm_eval_paired.py base.json changed.json                # every config in both
  scripts/llm_eval_paired.py base.json changed.json --pair cake/20%
  scripts/llm_eval_paired.py run.json run.json --pair snapkv/20%=cake/20%   # two methods of one run
  scripts/llm_eval_paired.py run.json --against cake   # every method against cake, per cache
  scripts/llm_eval_paired.py run.json --against cake --level 0.99   # another per-cell level
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


def mean_ci(diffs, clusters=None, level=0.95):
    """The mean of the per-prompt differences and its Student t interval, robust to
    clusters of prompts (clusters[i] names prompt i's; None: every prompt its own):
    variance sum_g (sum_{i in g} (d_i - mean))^2 / n^2 x G / (G - 1), G - 1 degrees
    of freedom. With one prompt per cluster this is the plain paired t interval."""
    n = len(diffs)
    mean = sum(diffs) / n
    clusters = clusters if clusters is not None else list(range(n))
    dev = {}
    for d, g in zip(diffs, clusters):
        dev[g] = dev.get(g, 0.0) + (d - mean)
    groups = len(dev)
    if groups < 2:  # one cluster says nothing of the spread
        return mean, (-math.inf, math.inf)
    se = math.sqrt(sum(v * v for v in dev.values()) * groups / (groups - 1)) / n
    half = t_quantile(0.5 + level / 2.0, groups - 1) * se
    return mean, (mean - half, mean + half)


def exact_sign_test(fewer, more):
    """Two-sided exact sign test: fewer and more units (clusters) went each way, the
    rest tied; the untied ones as a fair binomial. McNemar's exact test when each
    unit is one prompt."""
    n = fewer + more
    if n == 0:
        return 1.0
    k = min(fewer, more)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


class Run:
    """One evaluation's JSON: its config labels ("method/cache"), its prompts by
    (context, depth, filler, key), its steps a prompt, and each prompt's cluster."""

    def __init__(self, path):
        d = json.load(open(path))
        self.path = path
        self.configs = d["configs"]
        self.labels = ["%s/%s" % (m, c) for m, c in self.configs]
        self.steps = d["steps"]
        # the context asked for: prompts are cut to at most it, so the smallest above
        targets = sorted({s["context"] for s in d.get("summary", [])})
        self.runs, self.cluster = {}, {}
        for r in d["runs"]:
            key = (r["context"], r["depth"], r["filler"], r["key"])
            if key in self.runs:
                sys.exit("%s: two prompts with context %d, depth %g, filler %d, key %s" % ((path,) + key))
            self.runs[key] = r
            ctx = next((t for t in targets if t >= r["context"]), r["context"])
            self.cluster[key] = (ctx, r["filler"], r["depth"])

    def index(self, label):
        if label not in self.labels:
            sys.exit("%s has no config %s (it has %s)" % (self.path, label, ", ".join(self.labels)))
        return self.labels.index(label)

    def rate(self, i, keys, what):
        """Config i's mean over keys: agreement (a share of its steps) or needles found."""
        return sum(self.runs[k][what][i] / (self.steps if what == "agree" else 1) for k in keys) / len(keys)


def paired(a, ia, b, ib, keys, levels):
    """Config ib of run b against config ia of run a on the prompts keys (clustered
    as run a clusters them): the mean agreement difference b - a with its interval at
    each level, the prompts whose needle a found only and b found only, and the sign
    test's p over the clusters."""
    clusters = [a.cluster[k] for k in keys]
    diffs = [b.runs[k]["agree"][ib] / b.steps - a.runs[k]["agree"][ia] / a.steps for k in keys]
    cis = [mean_ci(diffs, clusters, lv)[1] for lv in levels]
    found = [(bool(a.runs[k]["found"][ia]), bool(b.runs[k]["found"][ib])) for k in keys]
    net = {}
    for (fa, fb), g in zip(found, clusters):
        net[g] = net.get(g, 0) + int(fb) - int(fa)
    p = exact_sign_test(sum(v < 0 for v in net.values()), sum(v > 0 for v in net.values()))
    only_a = sum(fa and not fb for fa, fb in found)
    only_b = sum(fb and not fa for fa, fb in found)
    return sum(diffs) / len(diffs), cis, only_a, only_b, p


def pts(x):
    """A share as signed points, one decimal, never "-0.0"."""
    v = round(100 * x, 1)
    return "%+.1f" % (v if v != 0 else 0.0)


def apart(ci):
    return ci[0] > 0 or ci[1] < 0


def compare(a_path, b_path, pairs, level=0.95):
    a, b = Run(a_path), Run(b_path)
    if not pairs:
        pairs = [(x, x) for x in a.labels if x in b.labels]
        if not pairs:
            sys.exit("no config is in both runs; name pairs with --pair A_CONFIG=B_CONFIG")
    shared = [k for k in a.runs if k in b.runs]
    if not shared:
        sys.exit("the runs share no prompt (context, depth, filler and key)")
    print("%s (A) against %s (B): %d prompts in both (A has %d, B %d), %d clusters (context, filler, depth); "
          "agreement over %d / %d steps a prompt" % (a_path, b_path, len(shared), len(a.runs), len(b.runs),
                                                    len({a.cluster[k] for k in shared}), a.steps, b.steps))
    print()
    print("| A | B | agreement A | agreement B | B - A, points [%g%% CI, clustered t] | needles A | needles B "
          "| A only / B only | sign test p |" % (100 * level))
    print("|---|---|---|---|---|---|---|---|---|")
    for ca, cb in pairs:
        ia, ib = a.index(ca), b.index(cb)
        mean, (ci,), only_a, only_b, p = paired(a, ia, b, ib, shared, [level])
        print("| %s | %s | %.1f | %.1f | %s [%s, %s]%s | %.0f | %.0f | %d / %d | %.3g |" % (
            ca, cb, 100 * a.rate(ia, shared, "agree"), 100 * b.rate(ib, shared, "agree"),
            pts(mean), pts(ci[0]), pts(ci[1]), " apart" if apart(ci) else "",
            a.rate(ia, shared, "found") * len(shared), b.rate(ib, shared, "found") * len(shared),
            only_a, only_b, p))


def against(path, base, level=0.95):
    """A matrix: every method against base at each cache of one run, each cell marked
    at the per-cell level (*) and at the Bonferroni level over the matrix's cells (**)."""
    run = Run(path)
    caches, methods = [], []
    for m, c in run.configs:
        caches += [c] if c not in caches else []
        methods += [m] if m not in methods and m != base else []
    if base not in {m for m, _ in run.configs}:
        sys.exit("%s has no method %s (it has %s)" % (path, base, ", ".join(methods)))
    cells = [(c, m) for c in caches for m in methods
             if "%s/%s" % (base, c) in run.labels and "%s/%s" % (m, c) in run.labels]
    family = 1 - (1 - level) / len(cells)
    keys = list(run.runs)
    print("%s: each method's agreement minus %s's, points, prompt by prompt (%d prompts in %d clusters); "
          "its interval (clustered t) excludes 0 at %g%% (*) or at %.4g%% (**: Bonferroni over the %d cells, "
          "%g%% for them together); needles found by the method only / by %s only, where the sign test "
          "over clusters has p < %g (*) or < %.3g (**)" % (
              path, base, len(keys), len(set(run.cluster.values())), 100 * level, 100 * family, len(cells),
              100 * level, base, 1 - level, 1 - family))
    print()
    print("| cache | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for c in caches:
        if "%s/%s" % (base, c) not in run.labels:
            continue
        i = run.index("%s/%s" % (base, c))
        out = []
        for m in methods:
            if (c, m) not in cells:
                out.append("-")
                continue
            j = run.index("%s/%s" % (m, c))
            mean, (ci, ci_family), only_base, only_m, p = paired(run, i, run, j, keys, [level, family])
            stars = "**" if apart(ci_family) else "*" if apart(ci) else ""
            cell = pts(mean) + stars
            if p < 1 - level:
                cell += " (%d/%d%s)" % (only_m, only_base, "**" if p < 1 - family else "*")
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
