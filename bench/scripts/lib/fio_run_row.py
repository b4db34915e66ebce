#!/usr/bin/env python3
"""Rows and summary of compare-tgt-iscsi.sh.

Row mode: FIO_JSON NAME RW QD ROUND DTICKS HZ DBUSY_NS [IOPS_LOG ...] prints
one tab-separated run: target, workload, QD, round, IOPS, slowest-fastest
second, mean latency, target CPU per I/O (OS), reactor busy per I/O, fio CPU.

Summary mode: --summary RESULTS_TSV prints the markdown tables: every run,
then per workload and QD the median of each target and the ratios the goal
is stated in (mirrorpoint IOPS / tgt IOPS, mirrorpoint CPU per I/O / tgt's):
the ratio of the medians, and the median and range of the ratios of the
rounds' pairs (the paired figure: each pair ran back to back).
"""

import json
import statistics
import sys


def per_second_iops(logs):
    """fio's per-second IOPS, summed over jobs; the last, partial second is
    left out when there is more than one."""
    per_sec = {}
    for log in logs:
        try:
            lines = open(log).read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                sec = int(fields[0]) // 1000
                per_sec[sec] = per_sec.get(sec, 0) + int(fields[1])
    values = [v for _, v in sorted(per_sec.items())]
    if len(values) > 1:
        values = values[:-1]
    return values


def row(args):
    path, name, rw, qd, rnd, dticks, hz, dbusy, *logs = args
    job = json.load(open(path))["jobs"][0]
    data = job["read"] if "read" in rw else job["write"]
    ios = max(data["total_ios"], 1)
    iops = data["iops"]
    lat = data["clat_ns"]["mean"] / 1000.0
    cpu_us = int(dticks) / int(hz) * 1e6 / ios
    busy = f"{int(dbusy) / 1e3 / ios:.2f}" if name == "mirrorpoint" else "-"
    fio_cpu = job["usr_cpu"] + job["sys_cpu"]
    secs = per_second_iops(logs)
    spread = f"{min(secs) / 1000:.0f}k-{max(secs) / 1000:.0f}k" if secs else "-"
    print(f"{name}\t{rw}\t{qd}\t{rnd}\t{iops:.0f}\t{spread}\t{lat:.1f}\t{cpu_us:.2f}\t{busy}\t{fio_cpu:.0f}")


def summary(path):
    runs = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]
    print("| target | workload | QD | round | IOPS | slowest-fastest second | mean lat (us) "
          "| target CPU per I/O, OS (us) | reactor busy per I/O (us) | fio CPU % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print("| " + " | ".join(r) + " |")
    print()
    print("Medians per target, and mirrorpoint against tgt (goal at QD 32: IOPS ratio >= 2, CPU ratio <= 0.5):")
    print("the ratio of the medians, then in brackets the ratios of each round's two runs (which ran")
    print("back to back, so mostly in the same machine state): their median; lowest-highest.")
    print()
    print("| workload | QD | mirrorpoint IOPS | tgt IOPS | IOPS ratio (pairs) "
          "| mirrorpoint CPU/IO (us) | tgt CPU/IO (us) | CPU ratio (pairs) |")
    print("|---|---|---|---|---|---|---|---|")
    cases = []
    for r in runs:
        if (r[1], r[2]) not in cases:
            cases.append((r[1], r[2]))
    for rw, qd in cases:
        by = {}
        for r in runs:
            if (r[1], r[2]) == (rw, qd):
                by.setdefault(r[0], {})[r[3]] = (float(r[4]), float(r[7]))
        mp, tgt = by.get("mirrorpoint", {}), by.get("tgt", {})
        if not mp or not tgt:
            continue

        def med(d, i):
            return statistics.median(v[i] for v in d.values())

        rounds = sorted(set(mp) & set(tgt))
        iops_pairs = [mp[k][0] / tgt[k][0] for k in rounds if tgt[k][0] > 0]
        cpu_pairs = [mp[k][1] / tgt[k][1] for k in rounds if tgt[k][1] > 0]

        def ratio(a, b, pairs):
            text = f"{a / b:.2f}x" if b > 0 else "-"
            if pairs:
                text += (f" ({statistics.median(pairs):.2f}x; "
                         f"{min(pairs):.2f}-{max(pairs):.2f})")
            return text

        print(f"| {rw} | {qd} | {med(mp, 0):.0f} | {med(tgt, 0):.0f} "
              f"| {ratio(med(mp, 0), med(tgt, 0), iops_pairs)} "
              f"| {med(mp, 1):.2f} | {med(tgt, 1):.2f} "
              f"| {ratio(med(mp, 1), med(tgt, 1), cpu_pairs)} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
    elif len(sys.argv) >= 9:
        row(sys.argv[1:])
    else:
        sys.exit(__doc__)
