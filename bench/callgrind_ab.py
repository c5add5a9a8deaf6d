#!/usr/bin/env python3
"""Instructions per iteration of Google Benchmark programs under callgrind, old vs new.

  bench/callgrind_ab.py OLD_BENCH_DIR NEW_BENCH_DIR [--programs dma,sim] [--filter REGEX]
                        [--exclude REGEX] [--min-time SECONDS] [--out results.json]

Runs every benchmark present in both directories' bench_<module> programs, one process at a
time, old and new alternated, under
  valgrind --tool=callgrind --separate-threads=yes
           --dump-before='*StartKeepRunning*' --dump-before='*FinishKeepRunning*'
  bench_X --benchmark_filter='^NAME$' --benchmark_min_time=0.2 --v=2
so that each dump between State::StartKeepRunning() and State::FinishKeepRunning() holds the
benchmark thread's instructions for exactly one timed loop (the set-up before the loop and
the tear-down after it are in other dumps). --v=2 prints the iteration count of each run.
The count per iteration is the difference of the last two runs' loops divided by the
difference of their iteration counts (first-iteration warm-up and the loop's constant cost
cancel) when both binaries ran two different counts; otherwise, for both, the last run's
loop over its count (Iterations(1), or a benchmark so slow under callgrind that one
iteration passes --min-time: raise it). Instructions of work under PauseTiming() are
counted too, the same way for both binaries. Needs Google Benchmark 1.7's --v=2 log lines
("Running NAME for N"). Results go to --out as JSON (a rerun skips the benchmarks already
there) and to the terminal: old, new, new/old.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile


def list_tests(prog):
    out = subprocess.run([prog, "--benchmark_list_tests"], capture_output=True, text=True,
                         check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def measure(prog, name, min_time):
    tmp = tempfile.mkdtemp(prefix="cgab-")
    try:
        cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
               f"--callgrind-out-file={tmp}/cg.out",
               "--dump-before=*StartKeepRunning*", "--dump-before=*FinishKeepRunning*",
               prog, f"--benchmark_filter=^{re.escape(name)}$",
               f"--benchmark_min_time={min_time}", "--v=2"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{prog} {name}: exit {res.returncode}\n{res.stderr[-2000:]}")
        iters = [int(m.group(1)) for m in
                 re.finditer(r"LOG\(2\): Running .* for (\d+)$", res.stdout + res.stderr, re.M)]
        dumps = []
        for f in os.listdir(tmp):
            m = re.fullmatch(r"cg\.out\.(\d+)-01", f)
            if not m:
                continue
            text = open(os.path.join(tmp, f)).read()
            trig = re.search(r"^desc: Trigger: (.*)$", text, re.M).group(1)
            total = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
            dumps.append((int(m.group(1)), trig, total))
        dumps.sort()
        loops = [t for _, trig, t in dumps if "FinishKeepRunning" in trig]
        if len(loops) != len(iters) or not loops:
            raise RuntimeError(f"{prog} {name}: {len(loops)} loops, {len(iters)} runs")
        return {"iters": iters, "loops": loops}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--programs", default="ranges,pci,provider,dma,sim")
    ap.add_argument("--filter", default="", help="only the benchmarks this regex finds")
    ap.add_argument("--exclude", default="", help="not the benchmarks this regex finds")
    ap.add_argument("--min-time", default="0.2")
    ap.add_argument("--out", default="callgrind_ab.json")
    a = ap.parse_args()
    results = {}
    if os.path.exists(a.out):
        results = json.load(open(a.out))
    for p in a.programs.split(","):
        old, new = f"{a.old}/bench_{p}", f"{a.new}/bench_{p}"
        common = [n for n in list_tests(old) if n in set(list_tests(new))]
        for name in common:
            if a.filter and not re.search(a.filter, name):
                continue
            if a.exclude and re.search(a.exclude, name):
                continue
            key = f"{p}:{name}"
            if key in results:
                continue
            o = measure(old, name, a.min_time)
            n = measure(new, name, a.min_time)
            # The same rule for both: the difference of the last two runs when both binaries
            # ran at least two different counts, else the last run's loop over its count.
            diff = all(len(r["iters"]) >= 2 and r["iters"][-1] != r["iters"][-2] for r in (o, n))
            for r in (o, n):
                it, lp = r["iters"], r["loops"]
                r["per_iter"] = (lp[-1] - lp[-2]) / (it[-1] - it[-2]) if diff else lp[-1] / it[-1]
            results[key] = {"old": o, "new": n, "ratio": n["per_iter"] / o["per_iter"],
                            "method": "difference" if diff else "last run"}
            print(f"{key:60s} {o['per_iter']:14.1f} {n['per_iter']:14.1f} "
                  f"{results[key]['ratio']:7.3f} {results[key]['method']}", flush=True)
            json.dump(results, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
