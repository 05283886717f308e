"""Where a pix2pix-zero edit's time goes outside the UNet steps, and what the VAE costs compiled.

For issue 10 (speed). The steady-state edit is 50 inversion steps and 50 steps of the two passes,
plus set-up (preprocessing, the text encoder, the VAE encoding) and the decoding. This script times
those pieces inside a real edit (``loops="graphs"`` by default, SD-1.4-sized random weights,
float16, 512x512, the benchmark's inputs): each wrapped function waits for the GPU before and
after, so its figure is its own GPU + host time. Then the VAE's encoder and decoder run on their own,
eager and ``torch.compile``d (``--compile``), at one and two images.

Usage::

    python benchmarks/diag_edit_overhead.py --compile --json benchmarks/results/edit_overhead_h200.json
    python benchmarks/diag_edit_overhead.py --tiny                     # CPU smoke test
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pix2pix_zero import build_pipeline, make_direction, test_picture  # noqa: E402

from p2pz_directions import sampling as S  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timers:
    """Wraps callables so that each call is timed (GPU synchronised around it) under a label."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.on = device, False
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def wrap(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(self.device)
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return timed


def median_ms(fn, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--loops", default="graphs")
    ap.add_argument("--compile", action="store_true", help="also time the VAE compiled")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    loops = args.loops if device.type == "cuda" else "eager"
    size, steps = (64, 3) if args.tiny else (512, 50)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline("tiny" if args.tiny else "sd14", device, dtype, "small", Path(tmp))
    from p2pz_plugins.pix2pix_zero import Pix2PixZeroEditor

    d, enc = make_direction(pipe)
    image, caption = test_picture(size), "a photo of a cat"
    ed = Pix2PixZeroEditor(pipe=pipe, encoder=enc)
    timers = Timers(device)
    vae, te = pipe.vae, pipe.text_encoder
    vae.encode = timers.wrap("vae.encode", vae.encode)
    vae.decode = timers.wrap("vae.decode", vae.decode)
    te.forward = timers.wrap("text_encoder", te.forward)
    for name in ("preprocess_images", "encode_image", "decode_latents"):
        setattr(S, name, timers.wrap(f"S.{name}", getattr(S, name)))
    marks: dict[str, float] = {}

    def progress(phase: str, step: int, total: int) -> None:
        if timers.on and step in (1, total):
            sync(device)
            marks[f"{phase}@{step}"] = time.perf_counter()

    def edit():
        return ed.edit(
            image, d, prompt=caption, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
            output_type="np", loops=loops, progress=progress,
        )  # fmt: skip

    for _ in range(2):  # capture, then one warm edit
        edit()
    timers.on = True
    sync(device)
    t0 = time.perf_counter()
    res = edit()
    sync(device)
    total = time.perf_counter() - t0
    timers.on = False
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "loops": loops,
        "passes": res.extra.get("passes"),
        "edit_s": total,
        "marks_s": {k: v - t0 for k, v in sorted(marks.items(), key=lambda kv: kv[1])},
        "pieces_s": dict(timers.seconds),
        "calls": dict(timers.calls),
    }
    print(json.dumps(report, indent=1), flush=True)

    # the VAE on its own: eager, then compiled
    g = torch.Generator(device="cpu").manual_seed(0)
    vae_rows: dict[str, dict] = {}
    encode, decode = vae.encode.__wrapped__, vae.decode.__wrapped__
    for n in (1, 2):
        px = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
        z = torch.randn(n, 4, size // 8, size // 8, generator=g).to(device, dtype)
        with torch.no_grad():
            row = {
                "encode_eager_ms": median_ms(lambda px=px: encode(px).latent_dist.mode(), args.reps, device),
                "decode_eager_ms": median_ms(lambda z=z: decode(z).sample, args.reps, device),
            }
            if args.compile:
                cenc = torch.compile(lambda x: encode(x).latent_dist.mode(), dynamic=False)
                cdec = torch.compile(lambda x: decode(x).sample, dynamic=False)
                for label, fn, x in (("encode", cenc, px), ("decode", cdec, z)):
                    sync(device)
                    t1 = time.perf_counter()
                    fn(x)
                    sync(device)
                    row[f"{label}_compile_first_s"] = time.perf_counter() - t1
                    row[f"{label}_compile_ms"] = median_ms(lambda fn=fn, x=x: fn(x), args.reps, device)
        vae_rows[f"b{n}"] = row
        print(f"vae b{n}", json.dumps(row), flush=True)
    report["vae"] = vae_rows
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
