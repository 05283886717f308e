"""CLI start-up on a CPU machine (issue 10): `p2pz --help`, `p2pz list` and `p2pz show` in fresh processes.

Each command runs ``--runs`` times in a new interpreter against a throw-away store holding one
direction; the table gives the median and the slowest wall time, the median CPU time of the child
(what a busy machine inflates least), and whether torch was imported (it must not be). Writes ``benchmarks/results/cli_startup_<tag>.json``.

    .venv/bin/python benchmarks/bench_cli_startup.py --runs 15 --tag cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = (
    "import runpy, sys, atexit\n"
    "def _report():\n"
    "    heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'diffusers'})\n"
    "    sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n')\n"
    "atexit.register(_report)\n"
    "sys.argv = ['p2pz', *sys.argv[1:]]\n"
    "runpy.run_module('p2pz_directions.cli', run_name='__main__')\n"
)


def _seed_store(home: Path) -> None:
    env = {**os.environ, "P2PZ_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    code = (
        "import torch\n"
        "from p2pz_directions.core.concept import Concept, EncoderInfo\n"
        "from p2pz_directions.core.store import LocalStore\n"
        "enc = EncoderInfo('openai/clip-vit-large-patch14', 768, 'clip')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "LocalStore().publish_many([Concept(n, torch.randn(77, 768, generator=g), enc) for n in ('cat', 'dog')])\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _time(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child: less sensitive to a busy machine, heavy modules)."""
    c0, t0 = _cpu(), time.perf_counter()
    p = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True)
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    if p.returncode != 0:
        raise SystemExit(f"p2pz {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    heavy = next((ln[6:] for ln in p.stderr.splitlines() if ln.startswith("HEAVY=")), "?")
    return dt, cpu, heavy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--tag", default="cpu")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        _seed_store(home)
        env = {**os.environ, "P2PZ_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        for args in (["--help"], ["list"], ["show", "cat->dog"]):
            _time(args, env)  # one unmeasured run: the OS file cache
            runs = [_time(args, env) for _ in range(a.runs)]
            times = sorted(t for t, _, _ in runs)
            heavy = sorted({h for _, _, h in runs} - {""})
            rows.append({"command": "p2pz " + " ".join(args), "median_s": statistics.median(times),
                         "max_s": times[-1], "median_cpu_s": statistics.median(c for _, c, _ in runs),
                         "runs": a.runs, "heavy_imports": heavy})  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {
        "bench": "cli_startup",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load {load:.2f}"
        if load is not None
        else "",
        "python": platform.python_version(),
        "rows": rows,
    }
    print(f"{result['machine']}, Python {result['python']}")
    print("| command | median wall | slowest | median CPU | torch/transformers/diffusers imported |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        heavy = ", ".join(r["heavy_imports"]) or "none"
        print(
            f"| `{r['command']}` | {r['median_s']:.3f} s | {r['max_s']:.3f} s | {r['median_cpu_s']:.3f} s | {heavy} |"
        )
    out = Path(__file__).parent / "results" / f"cli_startup_{a.tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
