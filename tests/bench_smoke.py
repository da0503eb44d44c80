#!/usr/bin/env python3
"""Checks a benchmark run's output for CI: every line that starts with '{' is one JSON object
with scenario, airlock, baseline, unit and ratio (numbers where numbers belong); every expected
scenario is there exactly once. The figures themselves are not judged here (CI machines are
noisy; targets are met in the notes, against same-run baselines).

usage: bench_smoke.py OUTPUT SCENARIO...
"""
import json
import math
import sys


def main():
    path, expected = sys.argv[1], sys.argv[2:]
    seen = {}
    problems = []
    for n, line in enumerate(open(path, errors="replace"), 1):
        if not line.startswith("{"):
            continue
        try:
            o = json.loads(line)
        except ValueError as e:
            problems.append(f"line {n}: not JSON: {e}")
            continue
        for k in ("scenario", "airlock", "baseline", "unit", "ratio"):
            if k not in o:
                problems.append(f"line {n}: no {k!r}: {line.strip()}")
        for k in ("airlock", "baseline", "ratio"):
            v = o.get(k)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                problems.append(f"line {n}: {k} is not a finite non-negative number: {v!r}")
        s = o.get("scenario")
        if s in seen:
            problems.append(f"line {n}: scenario {s} printed twice")
        seen[s] = o
    for s in expected:
        if s not in seen:
            problems.append(f"scenario {s} missing")
    for s, o in seen.items():
        print(f"  {s}: airlock {o.get('airlock')} {o.get('unit')}, baseline {o.get('baseline')}, ratio {o.get('ratio')}")
    for p in problems:
        print(f"bench-smoke: {p}")
    print(f"bench-smoke: {len(seen)} scenarios, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
