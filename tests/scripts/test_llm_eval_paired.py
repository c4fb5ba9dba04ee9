#!/usr/bin/env python3
"""scripts/llm_eval_paired.py against tabulated t quantiles and hand-computed
comparisons of small runs.

Run A: configs cake/20%, snapkv/20%; run B: cake/20%. Prompts p1-p3 are in both
(B lists them in another order), p4 only in A, p5 only in B. Agreeing steps of 20:
  A cake 10 14 16 (12 on p4)   A snapkv 12 16 19 (13 on p4)   B cake 14 16 18 (p5: 5)
  found: A cake 1 0 1 (0)      A snapkv 0 0 1 (1)             B cake 1 1 1 (p5: 0)
A cake -> B cake on p1-p3: differences .2 .1 .1, mean .1333, sd .05774, t(2) 4.3027:
  half width .1434 -> +13.3 [-1.0, +27.7]; needles 2 -> 3, discordant 0 / 1, p = 1.
A snapkv -> B cake: differences .1 0 -.05, mean .01667, sd .07638: +1.7 [-17.3, +20.6];
  needles 1 -> 3, discordant 0 / 2, p = 2 x 1/4 = 0.5.
A cake -> A snapkv on p1-p4: differences .1 .1 .15 .05, mean .1, sd .04082, t(3) 3.1824:
  +10.0 [+3.5, +16.5], apart; needles 2 and 2, discordant 1 / 1, p = 1 (the --against
  matrix: one cell, so its Bonferroni level is its own: +10.0**, no needle mark).
(These prompts are each their own cluster, so the clustered interval is the plain one.)

Run C (summary context 8170: every prompt's cluster is (8170, filler, depth)):
  q1, q2 filler 0 depth 0; q3, q4 filler 0 depth 0.5; q5 filler 1 depth 0.
  cake agree 10 12 14 16 10, snapkv 12 16 15 18 13: differences .1 .2 .05 .1 .15, mean .12;
  cluster sums of deviations .06, -.09, .03: variance (.0126 x 3/2) / 25, se .0274955,
  t(2) 4.302653 -> +12.0 [+0.2, +23.8] apart (unclustered it would be [+4.9, +19.1]).
  found cake 1 0 0 1 0, snapkv 1 1 1 0 0: prompts 1 / 2; clusters' net +1, 0, 0: p = 1.
Run N: 6 prompts, each its own cluster; tova finds all 6 needles, cake and h2o none,
  equal agreement: --against cake has 2 cells, Bonferroni level 97.5%; the sign test's
  p = 2/64 = .03125 < .05 but > .025: "+0.0 (6/0*)" for tova, "+0.0" for h2o.
"""
import json
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
scripts = os.path.join(here, "..", "..", "scripts")
script = os.path.join(scripts, "llm_eval_paired.py")
sys.path.insert(0, scripts)
import llm_eval_paired as lp  # noqa: E402

failures = []


def expect(cond, what):
    if not cond:
        failures.append(what)


# Student t 0.975 quantiles, as tabulated
for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (32, 2.0369), (109, 1.9820)):
    got = lp.t_quantile(0.975, df)
    expect(abs(got - t) < 1e-4, "t_quantile(0.975, %d) = %.5f, want %.4f" % (df, got, t))
for df, t in ((3, 5.8409), (32, 2.7385)):  # 0.995
    got = lp.t_quantile(0.995, df)
    expect(abs(got - t) < 1e-4, "t_quantile(0.995, %d) = %.5f, want %.4f" % (df, got, t))
expect(abs(lp.betainc(1, 1, 0.3) - 0.3) < 1e-12, "I_0.3(1, 1) = 0.3")
expect(abs(lp.betainc(2.5, 2.5, 0.5) - 0.5) < 1e-12, "I_0.5(a, a) = 0.5")
expect(abs(lp.betainc(2, 3, 0.4) - 0.5248) < 1e-12, "I_0.4(2, 3) = 0.5248")  # 1 - (1-x)^3 (1 + 3x)
# one prompt: no interval (never "apart"); equal differences: the interval is the point
expect(lp.mean_ci([0.1]) == (0.1, (float("-inf"), float("inf"))), "mean_ci of one prompt")
expect(lp.mean_ci([0.1, 0.1]) == (0.1, (0.1, 0.1)), "mean_ci of equal differences")
# clusters a a b b c: mean .34; cluster deviations -.38, .22, .16; variance
# (.2184 x 3/2) / 25, se .114473; t(2) 4.302653: half width .492537
m, (lo, hi) = lp.mean_ci([0.1, 0.2, 0.3, 0.6, 0.5], ["a", "a", "b", "b", "c"])
expect(abs(m - 0.34) < 1e-12 and abs(lo + 0.152537) < 1e-5 and abs(hi - 0.832537) < 1e-5,
       "clustered mean_ci: %g [%g, %g]" % (m, lo, hi))
expect(lp.mean_ci([0.1, 0.3], ["a", "a"])[1] == (float("-inf"), float("inf")), "one cluster: no interval")
# exact McNemar: the discordant pairs as a fair binomial, two-sided
for a, b, p in ((0, 5, 0.0625), (1, 1, 1.0), (2, 8, 0.109375), (0, 0, 1.0)):
    got = lp.exact_sign_test(a, b)
    expect(abs(got - p) < 1e-12, "exact_sign_test(%d, %d) = %g, want %g" % (a, b, got, p))


def run(configs, prompts):
    return {"configs": configs, "steps": 20,
            "runs": [{"context": c, "depth": d, "filler": f, "key": k, "found": fo, "agree": ag}
                     for (c, d, f, k), fo, ag in prompts]}


p1, p2, p3 = (8000, 0, 0, "11111"), (8001, 0.5, 0, "22222"), (8002, 1, 0, "33333")
p4, p5 = (8003, 0.1, 1, "44444"), (8004, 0.2, 1, "55555")
a = run([["cake", "20%"], ["snapkv", "20%"]],
        [(p1, [1, 0], [10, 12]), (p2, [0, 0], [14, 16]), (p3, [1, 1], [16, 19]), (p4, [0, 1], [12, 13])])
b = run([["cake", "20%"]], [(p3, [1], [18]), (p1, [1], [14]), (p5, [0], [5]), (p2, [1], [16])])

with tempfile.TemporaryDirectory() as tmp:
    pa, pb = os.path.join(tmp, "a.json"), os.path.join(tmp, "b.json")
    json.dump(a, open(pa, "w"))
    json.dump(b, open(pb, "w"))

    def lines(*args, ok=True):
        r = subprocess.run([sys.executable, script] + list(args), capture_output=True, text=True)
        expect((r.returncode == 0) == ok, "exit %d for %s: %s" % (r.returncode, args, r.stderr))
        return r.stdout.splitlines(), r.stderr

    out, _ = lines(pa, pb)
    expect(any("3 prompts in both (A has 4, B 4)" in x for x in out), "prompts matched by content: %s" % out[:1])
    want = "| cake/20% | cake/20% | 66.7 | 80.0 | +13.3 [-1.0, +27.7] | 2 | 3 | 0 / 1 | 1 |"
    expect(want in out, "default pair: want %s in %s" % (want, out))
    expect(not any(x.startswith("| snapkv") for x in out), "only configs in both by default")

    out, _ = lines(pa, pb, "--pair", "snapkv/20%=cake/20%")
    want = "| snapkv/20% | cake/20% | 78.3 | 80.0 | +1.7 [-17.3, +20.6] | 1 | 3 | 0 / 2 | 0.5 |"
    expect(want in out, "named pair: want %s in %s" % (want, out))

    out, _ = lines(pa, pa, "--pair", "cake/20%=snapkv/20%")
    want = "| cake/20% | snapkv/20% | 65.0 | 75.0 | +10.0 [+3.5, +16.5] apart | 2 | 2 | 1 / 1 | 1 |"
    expect(want in out, "two methods of one run: want %s in %s" % (want, out))

    # at 99% (t(3) 0.995 = 5.8409): half width .1192 -> [-1.9, +21.9], no longer apart
    out, _ = lines(pa, pa, "--pair", "cake/20%=snapkv/20%", "--level", "0.99")
    want = "| cake/20% | snapkv/20% | 65.0 | 75.0 | +10.0 [-1.9, +21.9] | 2 | 2 | 1 / 1 | 1 |"
    expect(want in out and any("[99% CI, clustered t]" in x for x in out), "--level 0.99: want %s in %s" % (want, out))
    out, _ = lines(pa, "--against", "cake", "--level", "0.99")
    expect("| 20% | +10.0 |" in out, "--against at 99%%: %s" % out)
    _, err = lines(pa, "--against", "cake", "--level", "95", ok=False)
    expect("--level needs" in err, "--level 95 refused: %s" % err)

    # the matrix of every method against one, per cache: the same comparison as above
    out, _ = lines(pa, "--against", "cake")
    expect("| cache | snapkv |" in out and "| 20% | +10.0** |" in out, "--against cake: %s" % out)
    _, err = lines(pa, "--against", "h2o", ok=False)
    expect("has no method h2o" in err, "--against an absent method: %s" % err)

    # clusters: prompts of one context, filler and depth move together
    q = [(8000, 0, 0, "1"), (8001, 0, 0, "2"), (8002, 0.5, 0, "3"), (8003, 0.5, 0, "4"), (8004, 0, 1, "5")]
    c = run([["cake", "20%"], ["snapkv", "20%"]],
            [(q[0], [1, 1], [10, 12]), (q[1], [0, 1], [12, 16]), (q[2], [0, 1], [14, 15]),
             (q[3], [1, 0], [16, 18]), (q[4], [0, 0], [10, 13])])
    c["summary"] = [{"context": 8170}]
    pc = os.path.join(tmp, "c.json")
    json.dump(c, open(pc, "w"))
    out, _ = lines(pc, pc, "--pair", "cake/20%=snapkv/20%")
    want = "| cake/20% | snapkv/20% | 62.0 | 74.0 | +12.0 [+0.2, +23.8] apart | 2 | 3 | 1 / 2 | 1 |"
    expect(want in out and any("5 prompts in both (A has 5, B 5), 3 clusters" in x for x in out),
           "clustered pair: want %s in %s" % (want, out))

    # the needles' mark, and which side it counts first
    n = run([["cake", "64"], ["tova", "64"], ["h2o", "64"]],
            [((8000 + i, i / 10, 0, str(i)), [0, 1, 0], [10, 10, 10]) for i in range(6)])
    n["summary"] = [{"context": 8170}]
    pn = os.path.join(tmp, "n.json")
    json.dump(n, open(pn, "w"))
    out, _ = lines(pn, "--against", "cake")
    expect("| cache | tova | h2o |" in out and "| 64 | +0.0 (6/0*) | +0.0 |" in out, "needle mark: %s" % out)

    # two prompts alike are refused, not merged
    dup = run([["cake", "64"]], [(p1, [0], [10]), (p1, [1], [12])])
    pd = os.path.join(tmp, "dup.json")
    json.dump(dup, open(pd, "w"))
    _, err = lines(pd, pd, ok=False)
    expect("two prompts" in err, "duplicate prompt refused: %s" % err)

    _, err = lines(pa, pb, "--pair", "h2o/20%", ok=False)
    expect("has no config h2o/20%" in err and "cake/20%" in err, "unknown config named: %s" % err)

if failures:
    sys.exit("FAILED:\n" + "\n".join(failures))
print("llm_eval_paired: all checks passed")
