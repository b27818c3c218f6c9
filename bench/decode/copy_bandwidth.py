#!/usr/bin/env python3
"""Measured memory bandwidth of the GPU: a 4 GiB device-to-device copy with torch, timed with
CUDA events, median of 10 after a warm-up; bytes read plus written per second. Prints
`copy_bytes_per_s=<value> copy_ms=<value>`; exits 1 (with the reason on stderr) when torch or a
CUDA device is missing, so that a caller can skip it.

  copy_bandwidth.py >> device.txt
"""

import statistics
import sys

COPY_BYTES = 4 << 30
REPEATS = 10


def main():
    try:
        import torch
    except ImportError:
        print("copy bandwidth: torch not installed", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("copy bandwidth: no CUDA device", file=sys.stderr)
        return 1
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(REPEATS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    median = statistics.median(seconds)
    print("copy_bytes_per_s=%.4g copy_ms=%.3f" % (2 * COPY_BYTES / median, 1e3 * median))
    return 0


if __name__ == "__main__":
    sys.exit(main())
