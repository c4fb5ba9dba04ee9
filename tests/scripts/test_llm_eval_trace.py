#!/usr/bin/env python3
"""scripts/llm_eval_trace.py on a hand-made trace (trace_small.log): every figure
below is counted by hand from that file. Trial 2 is left out (the full cache
missed it); 2 KV heads (the largest count shown).
  cake:   trial 0 found, trial 1 found. Whole-key shares of the finds: prefill
          (8/8 + 7/8) / 2 = 93.8%, decoded (7/8 + 7/8) / 2 = 87.5%; decoding
          changed one layer of trial 0: 0.50 a prompt.
  snapkv: trial 0 " 126." starts like 12345 (12); trial 1 " 55." does not.
          Misses' shares: (5/8 + 2/8) / 2 = 43.8% both; no change.
  layer 3 pooled (decoded < 2): cake t0 (found), snapkv t0, snapkv t1: 3, 1 found;
          layer 0: snapkv t1 alone, not found; layer 2: cake t1, found.
  layer 1 (prefill == 2): cake t0, t1 held (2 found); snapkv t0 not (1 row), t1 not.
"""
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
script = os.path.join(here, "..", "..", "scripts", "llm_eval_trace.py")


def check(log, want, what):
    """The script's output on log (--layer 1) has every line of want."""
    out = subprocess.run([sys.executable, script, log, "--layer", "1"], check=True,
                         capture_output=True, text=True).stdout
    missing = [w for w in want if w not in out.splitlines()]
    if missing:
        print(out)
        sys.exit("missing lines (%s):\n%s" % (what, "\n".join(missing)))


want = [
    "3 traced prompts, 2 whose needle the full cache found; 4 layers, 2 KV heads",
    "| cake 16 | 2 | 0 | 0 | - | 93.8% / 87.5% | 0.50 |",
    "| snapkv 16 | 0 | 1 | 1 | 43.8% / 43.8% | - | 0.00 |",
    "| 3 | 3 | 1 | 0.33 |",
    "| 0 | 1 | 0 | 0.00 |",
    "| 2 | 1 | 1 | 1.00 |",
    "| cake 16 | 2 | 2 | 0 | 0 |",
    "| snapkv 16 | 0 | 0 | 2 | 0 |",
]
check(os.path.join(here, "trace_small.log"), want, "trace_small.log")

# A model of 10 KV heads (comma-separated counts), escaped answers (a quote, a newline:
# the key found only after unescaping `1\n2` is not the key), a key that could not be
# located ([-1, -1): left out), and a log cut after a header (left out).
trace10 = """model big: 2 layers, 20/10 heads, context limit 100 tokens (from the file)
trace context 90 trial 0 key 42424 tokens [5, 10): full " 42424" found
  cake                16  key rows per layer: prefill 10,7, decoded 10,6,  " the \\"key\\" is 42424"
trace context 90 trial 1 key 31313 tokens [20, 25): full " 31313" found
  cake                16  key rows per layer: prefill 10,10, decoded 10,10,  " 31\\n313"
trace context 90 trial 2 key 77777 tokens [-1, -1): full " 77777" found
  cake                16  key rows per layer: prefill  decoded   " 77777"
trace context 90 trial 3 key 55555 tokens [40, 45): full " 55555" found
"""
with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as f:
    f.write(trace10)
# trial 0 found (17/20 rows, then 16/20), trial 1 missed but starts like the key (31).
want10 = [
    "4 traced prompts, 2 whose needle the full cache found; 2 layers, 10 KV heads",
    "| cake 16 | 1 | 1 | 0 | 100.0% / 100.0% | 85.0% / 80.0% | 0.50 |",
    "| 1 | 1 | 1 | 1.00 |",
    "| cake 16 | 1 | 0 | 1 | 1 |",
]
try:
    check(f.name, want10, "10 heads")
finally:
    os.unlink(f.name)
print("ok: %d lines checked" % (len(want) + len(want10)))
