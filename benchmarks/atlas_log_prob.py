"""log_prob throughput of AtlasFlowDistribution for K = 4 and K = 64 charts at the same m.

Median of repeats, a fresh input tensor every repeat (Pyro's transform caches would flatter
repeated calls on one tensor), all configurations timed side by side in one run.

    python benchmarks/atlas_log_prob.py [--device cuda] [--points 4096] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from atlasdist import AtlasFlow, ChartMembership


def time_log_prob(atlas, points, repeats, device):
    p = atlas.flow(validate_args=False)
    times = []
    for i in range(repeats + 2):
        x = p.sample((points,)).detach().clone()  # fresh tensor, on the support
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            p.log_prob(x)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--m", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    configs = [(4, args.m), (64, args.m), (64, 64)]
    print(
        f"device={args.device}  threads={torch.get_num_threads()}  points={args.points}  "
        f"D=3 d=2, default flows (2 spline + 2 coupling layers, hidden 64x64)"
    )
    print("| charts K | candidates m | median time (ms) | points/s |")
    print("|---:|---:|---:|---:|")
    for k, m in configs:
        atlas = AtlasFlow(3, 2, k, membership=ChartMembership(m=m)).to(args.device)
        t = time_log_prob(atlas, args.points, args.repeats, args.device)
        print(f"| {k} | {m} | {1e3 * t:.1f} | {args.points / t:,.0f} |")


if __name__ == "__main__":
    main()
