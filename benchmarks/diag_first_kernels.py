"""What a fresh process pays before its first real GPU work: import torch, the CUDA context, and the
first call of each kind of kernel an edit uses (cuBLAS, cuDNN convolutions, fused attention, ...).

For issue 10 (the first edit in a fresh process). Each measurement runs in its own new Python
process, ``--runs`` times, and the median is reported: the time of ``import torch``, of the CUDA
context (``torch.zeros(1, device="cuda")``), then of the first float16 matmul, 3x3 convolution,
group norm, scaled-dot-product attention at SD's 64x64 self-attention size, a small CUDA-graph
capture, and (with ``--read FILE``) reading a safetensors file onto the GPU with safetensors'
``load_file`` against p2pz's reader. The same ops a second time show what is first-call cost.

Usage::

    python benchmarks/diag_first_kernels.py --json $OUT/first_kernels.json [--read unet.safetensors]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
marks = []
def mark(name):
    torch.cuda.synchronize() if 'torch' in globals() and torch.cuda.is_initialized() else None
    marks.append((name, time.perf_counter()))
import torch
mark("import torch")
x = torch.zeros(1, device="cuda"); mark("cuda context")
h = torch.float16
a = torch.randn(2 * 4096, 320, device="cuda", dtype=h); w = torch.randn(320, 320, device="cuda", dtype=h)
mark("randn")
for rep in ("first", "second"):
    y = a @ w; mark(f"matmul ({rep})")
    c = torch.nn.functional.conv2d(torch.randn(2, 320, 64, 64, device="cuda", dtype=h),
                                   torch.randn(320, 320, 3, 3, device="cuda", dtype=h), padding=1)
    mark(f"conv2d 3x3 ({rep})")
    g = torch.nn.functional.group_norm(c, 32); mark(f"group_norm ({rep})")
    q = torch.randn(2, 8, 4096, 40, device="cuda", dtype=h)
    o = torch.nn.functional.scaled_dot_product_attention(q, q, q); mark(f"sdpa 4096x40 ({rep})")
    l = torch.nn.functional.layer_norm(a, (320,)); mark(f"layer_norm ({rep})")
    e = torch.nn.functional.gelu(a); mark(f"gelu ({rep})")
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    y = a @ w
torch.cuda.current_stream().wait_stream(s)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    y = torch.nn.functional.gelu(a @ w)
mark("graph capture (matmul + gelu)")
graph.replay(); mark("graph replay")
if len(sys.argv) > 1:
    from safetensors.torch import load_file
    path, how = sys.argv[1], sys.argv[2]
    if how == "load_file":
        sd = load_file(path, device="cuda")
    else:
        from p2pz_directions.lean.reading import read_safetensors
        sd = read_safetensors(path, torch.device("cuda"), torch.float16)
    mark(f"read {how}")
    if how == "load_file":
        sd = load_file(path, device="cuda")
    else:
        sd = read_safetensors(path, torch.device("cuda"), torch.float16)
    mark(f"read {how} (again)")
out = {}
prev = t0
for name, t in marks:
    out[name] = t - prev
    prev = t
print(json.dumps(out))
"""


def run(args: list[str]) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--read", type=Path, default=None, help="a safetensors file to time reading onto the GPU")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    variants = {"ops": []}
    if a.read:
        variants = {"ops + load_file": [str(a.read), "load_file"], "ops + p2pz reader": [str(a.read), "p2pz"]}
    results: dict[str, dict[str, float]] = {}
    for name, extra in variants.items():
        runs = [run(extra) for _ in range(a.runs)]
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"\n{name} (median of {a.runs} fresh processes, seconds)")
        for k, v in results[name].items():
            print(f"  {k:34s} {v:8.4f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
