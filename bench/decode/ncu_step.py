"""Per-kernel time and DRAM bandwidth of the last decode step in an ncu --csv trace.

The trace comes from decode_bench run under ncu with --decode_graphs=false (kernels launched one
by one) and --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum. The last
step starts at the last EmbeddingGatherKernel. Prints one line per kernel name: launches, total
microseconds, GB moved and GB/s, then the step's totals.
"""

import collections
import csv
import sys


def main(path):
    rows = []
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        rows.append(row)
    # One record per (launch, metric).
    launches = collections.OrderedDict()
    for row in rows:
        key = row["ID"]
        entry = launches.setdefault(key, {"name": row["Kernel Name"]})
        value = float(row["Metric Value"].replace(",", ""))
        unit = row["Metric Unit"]
        # Times to microseconds, bytes to GB.
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3,
                 "msecond": 1e3, "byte": 1e-9, "Kbyte": 1e-6, "Mbyte": 1e-3, "Gbyte": 1.0,
                 "B": 1e-9, "KB": 1e-6, "MB": 1e-3, "GB": 1.0}.get(unit)
        if scale is None:
            raise SystemExit(f"unknown unit {unit!r} of {row['Metric Name']}")
        entry[row["Metric Name"]] = value * scale
    ordered = list(launches.values())
    starts = [i for i, e in enumerate(ordered) if "EmbeddingGather" in e["name"]]
    if not starts:
        print("no EmbeddingGatherKernel in the trace")
        return 1
    step = ordered[starts[-1]:]
    by_name = collections.OrderedDict()
    for e in step:
        name = e["name"].split("(")[0][:70]
        agg = by_name.setdefault(name, [0, 0.0, 0.0])
        agg[0] += 1
        agg[1] += e.get("gpu__time_duration.sum", 0.0)
        agg[2] += e.get("dram__bytes_read.sum", 0.0) + e.get("dram__bytes_write.sum", 0.0)
    total_us = sum(a[1] for a in by_name.values())
    total_gb = sum(a[2] for a in by_name.values())
    for name, (count, us, gb) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"{count:5d} {us:10.1f} us {gb:8.3f} GB {gb / us * 1e6 if us else 0:8.0f} GB/s  {name}")
    print(f"step: {len(step)} kernels, {total_us:.1f} us of kernel time, {total_gb:.3f} GB, "
          f"{total_gb / total_us * 1e6:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
