"""What the Python call costs over the Rust call: `favor.attention` against `favor-bench profile`
(the same backend, shape and feature map, timed by favor-bench around the Rust call alone), in
alternating rounds on one machine.

    python favor-py/bench/overhead.py --favor-bench target/release/favor-bench
"""

import argparse
import re
import statistics
import subprocess
import time

import numpy as np

import favor

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def rust_median(bench, backend, length, causal, iters, args):
    cmd = [bench, "profile", "--backend", backend, "--direction", "causal" if causal else "bidirectional"]
    cmd += ["--heads", str(args.heads), "--d", str(args.d), "--m", str(args.m), "--len", str(length)]
    cmd += ["--iters", str(iters), "--no-phases"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"median ([0-9.]+) (ns|µs|us|ms|s)\b", out)
    if not m:
        raise RuntimeError(f"cannot read favor-bench's median from:\n{out}")
    return float(m.group(1)) * UNITS[m.group(2)]


def python_median(backend, length, causal, iters, args, reuse):
    """The median call; `reuse`: into one output array (`out=`) instead of a new one per call."""
    rng = np.random.default_rng(0)
    q, k, v = ((rng.standard_normal((1, args.heads, length, args.d)) * 0.5).astype(np.float32) for _ in range(3))
    out = np.empty_like(q) if reuse else None
    call = lambda: favor.attention(q, k, v, causal=causal, num_features=args.m, seed=0, backend=backend, out=out)
    for _ in range(2):
        call()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--favor-bench", required=True, help="path of the favor-bench binary (release build)")
    p.add_argument("--backend", default="simd")
    p.add_argument("--lens", default="1024,65536")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--m", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"backend {favor._backend(args.backend).name}, B = 1, H = {args.heads}, d = {args.d}, m = {args.m}, f32")
    print("python: a new result array per call; python out=: one output array reused")
    print(f"{'direction':<14} {'L':>6} {'rust':>10} {'python':>10} {'ratio':>7} {'python out=':>12} {'ratio':>7}")
    for length in (int(x) for x in args.lens.split(",")):
        iters = 30 if length <= 4096 else 5
        for causal in (False, True):
            rust, py, py_out = [], [], []
            for _ in range(args.rounds):
                rust.append(rust_median(args.favor_bench, args.backend, length, causal, iters, args))
                py.append(python_median(args.backend, length, causal, iters, args, reuse=False))
                py_out.append(python_median(args.backend, length, causal, iters, args, reuse=True))
            r, s, o = (statistics.median(x) for x in (rust, py, py_out))
            name = "causal" if causal else "bidirectional"
            print(f"{name:<14} {length:>6} {r * 1e3:>8.2f}ms {s * 1e3:>8.2f}ms {s / r:>7.3f} {o * 1e3:>10.2f}ms {o / r:>7.3f}")


if __name__ == "__main__":
    main()
