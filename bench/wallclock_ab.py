#!/usr/bin/env python3
"""Wall-clock A/B of Google Benchmark programs, old and new binaries alternated.

  bench/wallclock_ab.py OLD_BENCH_DIR NEW_BENCH_DIR [--programs dma,pci] [--filter REGEX]
                        [--exclude REGEX] [--rounds 5] [--min-time SECONDS] [--out ab.json]
                        [--per-benchmark]

For each bench_<module> program present in both directories, runs the old and then the new
binary ROUNDS times in turn (old, new, old, new, ...), each run one repetition of every
benchmark both binaries have that matches the filter. A machine with fast and slow phases
then slows both sides alike, which running all old repetitions before all new ones does not
guarantee. With --per-benchmark the alternation is per benchmark instead (old X, new X, old X,
...; one process per run), so that phases of a few seconds, as this class of VM has, fall on
both sides of each pair. Reports per benchmark the median real time over the rounds of each
side, new/old of the medians and the median of the paired ratios (each new run over the old
run right before it), the same paired median of CPU time (less sensitive to other processes
taking the CPU, which stretches real time only), and writes the samples and medians to --out
as JSON. Benchmarks whose median
ratio and median paired ratio are both above --budget (default 1.05) are listed at the end and the exit status is 1.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile


def list_tests(prog):
    out = subprocess.run([prog, "--benchmark_list_tests"], capture_output=True, text=True,
                         check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def run_once(prog, names, min_time):
    """One repetition of each benchmark in names: {name: (real, CPU) time in ns}."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        cmd = [prog, f"--benchmark_filter={pattern}", f"--benchmark_out={out.name}",
               "--benchmark_out_format=json", "--benchmark_format=console"]
        if min_time:
            cmd.append(f"--benchmark_min_time={min_time}")
        res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{prog}: exit {res.returncode}\n{res.stderr[-2000:]}")
        data = json.load(open(out.name))
    scale = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}
    times = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" or b.get("error_occurred"):
            continue
        times[b["name"]] = (b["real_time"] * scale[b.get("time_unit", "ns")],
                            b["cpu_time"] * scale[b.get("time_unit", "ns")])
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--programs", default="dma,pci,provider,ranges,sim")
    ap.add_argument("--filter", default=".")
    ap.add_argument("--exclude", default="")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", default="")
    ap.add_argument("--budget", type=float, default=1.05)
    ap.add_argument("--out", default="")
    ap.add_argument("--per-benchmark", action="store_true",
                    help="alternate old and new per benchmark rather than per program")
    a = ap.parse_args()
    if a.rounds < 1:
        sys.exit("wallclock_ab.py: --rounds must be at least 1")
    results = {}
    for mod in [p for p in a.programs.split(",") if p]:
        old, new = (os.path.join(d, f"bench_{mod}") for d in (a.old, a.new))
        if not (os.access(old, os.X_OK) and os.access(new, os.X_OK)):
            print(f"skip bench_{mod}: not in both directories", file=sys.stderr)
            continue
        both = [n for n in list_tests(old) if n in set(list_tests(new))
                and re.search(a.filter, n) and not (a.exclude and re.search(a.exclude, n))]
        if not both:
            continue
        samples = {n: {"old": [], "new": []} for n in both}
        groups = [[n] for n in both] if a.per_benchmark else [both]
        for g in groups:
            for r in range(a.rounds):
                for side, prog in (("old", old), ("new", new)):
                    what = g[0] if a.per_benchmark else f"bench_{mod}"
                    print(f"{what}: round {r + 1}/{a.rounds} {side}", file=sys.stderr)
                    got = run_once(prog, g, a.min_time)
                    for n in g:
                        # A benchmark missing from one run (an error) drops its whole pair.
                        samples[n][side].append(got.get(n))
        for n, s in samples.items():
            pairs = [(o, w) for o, w in zip(s["old"], s["new"]) if o and w and o[0] and o[1]]
            if not pairs:
                continue
            olds, news = [o[0] for o, _ in pairs], [w[0] for _, w in pairs]
            mo, mn = statistics.median(olds), statistics.median(news)
            results[n] = {"old_ns": mo, "new_ns": mn, "ratio": mn / mo if mo else float("nan"),
                          "paired_ratio": statistics.median(w[0] / o[0] for o, w in pairs),
                          "old_cpu_ns": statistics.median(o[1] for o, _ in pairs),
                          "new_cpu_ns": statistics.median(w[1] for _, w in pairs),
                          "cpu_paired_ratio": statistics.median(w[1] / o[1] for o, w in pairs),
                          "old_samples": olds, "new_samples": news,
                          "old_cpu_samples": [o[1] for o, _ in pairs], "new_cpu_samples": [w[1] for _, w in pairs]}
    width = max((len(n) for n in results), default=10)
    print(f"{'benchmark':<{width}}  {'old':>12}  {'new':>12}  new/old  paired  cpu paired")
    for n, r in results.items():
        print(f"{n:<{width}}  {r['old_ns']:>10.1f}ns  {r['new_ns']:>10.1f}ns  {r['ratio']:.3f}    {r['paired_ratio']:.3f}   {r['cpu_paired_ratio']:.3f}")
    over = [n for n, r in results.items() if r["ratio"] > a.budget and r["paired_ratio"] > a.budget]
    if a.out:
        json.dump({"rounds": a.rounds, "budget": a.budget, "results": results}, open(a.out, "w"), indent=1)
    if over:
        print(f"\nover the {a.budget:.2f} budget: " + ", ".join(over))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
