"""Where a UNet step's time goes: one sampling step of each kind, timed per runner variant.

For issue 10 (speed). An SD-1.4-sized UNet (random weights, float16, 64x64 latents = 512x512
images) runs three steps through `UNetRunner`, each in several variants:

- ``cfg``: a classifier-free-guided noise prediction at batch 2 (SDEdit's and DiffEdit's step, the
  reference pass of pix2pix-zero without the maps);
- ``reference``: pix2pix-zero's reference step (batch 2, cross-attention maps recorded);
- ``guided``: pix2pix-zero's cross-attention-guided step (forward + backward + forward at batch 2);
- ``unet``: one plain UNet pass at the image count (no CFG: the inversion's pass);
- ``regularizer``: the inversion's noise regularizer alone (25 auto-correlation and 5 KL gradient
  steps on one noise prediction, closed form);
- ``invert``: pix2pix-zero's inversion step (``unet`` followed by ``regularizer``).

Variants: ``graphs`` (CUDA graphs of the eager step, the default), ``compile`` (the step compiled
with ``torch.compile`` and then captured as a CUDA graph), each with ``+cl`` (UNet in
channels_last memory format, no cudnn.benchmark) and ``+bench`` (``torch.backends.cudnn.benchmark``
on from that variant on); ``+cudnn`` / ``+mea`` (scaled-dot-product attention through cuDNN's or the
memory-efficient kernel only, for that variant; the default takes the kernel PyTorch ranks first,
which on an H200 gave the cuDNN-only variant's output bit for bit); ``compile``
also takes inductor options: ``+c1x1`` (``conv_1x1_as_mm``), ``+cdt`` (``coordinate_descent_tuning``) and
``+noepi`` (``epilogue_fusion=False``), ``+mat`` (``max_autotune``: Triton templates timed against
cuBLAS / cuDNN per shape); ``+qkv`` (each attention layer's input projections as one
matrix product, `FusedProjections`). Reported per variant: the first call (compile +
capture) in seconds, the median step in milliseconds over ``--reps`` replays, the max abs
difference of the step's output from the ``graphs`` variant's, and the step's achieved TFLOP/s
(FLOPs counted once by ``torch.utils.flop_counter``). ``--batch 1,2,4`` runs each step for that
many images (CFG doubles the UNet batch): whether a batch is cheaper per image is a question of
how far from the GPU's peak the one-image step runs.

Usage::

    python benchmarks/diag_unet_step.py --json benchmarks/results/unet_step_h200.json      # GPU
    python benchmarks/diag_unet_step.py --tiny                                              # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pix2pix_zero import build_pipeline  # noqa: E402

from p2pz_directions import sampling as S  # noqa: E402
from p2pz_directions.sampling import pix2pix_zero as P  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


_INDUCTOR_FLAGS = {
    "c1x1": ("conv_1x1_as_mm", True),
    "cdt": ("coordinate_descent_tuning", True),
    "noepi": ("epilogue_fusion", False),
    "mat": ("max_autotune", True),
}


def _sdpa_backends(flags: list[str]):
    """A context that restricts scaled-dot-product attention to one kernel (``+cudnn`` / ``+mea``), or
    does nothing. No fallback: a case the kernel does not take fails the variant."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "mea": SDPBackend.EFFICIENT_ATTENTION}
    picked = [chosen[f] for f in flags if f in chosen]
    if not picked:
        return contextlib.nullcontext
    return lambda: sdpa_kernel(picked, set_priority=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default="graphs,graphs+cl,compile,compile+cl")
    ap.add_argument("--steps", default="cfg,reference,guided")
    ap.add_argument("--batch", default="1", help="image counts, comma-separated (CFG doubles the UNet batch)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline("tiny" if args.tiny else "sd14", device, dtype, "small", Path(tmp))
    unet = pipe.unet
    side = 8 if args.tiny else 64
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.tensor(501, device=device)
    idx = torch.zeros((), dtype=torch.int64, device=device)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "latents": f"{side}x{side}",
    }
    print(json.dumps(info), flush=True)
    rows: dict[str, dict] = {}
    base_out: dict[str, torch.Tensor] = {}
    for n in [int(b) for b in args.batch.split(",")]:
        x = torch.randn(n, 4, side, side, generator=g).to(device, dtype)
        emb = torch.randn(2 * n, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
        maps, ref_maps = P.AttentionMaps(num_steps=1), P.AttentionMaps(num_steps=1)
        with P.attention_maps(unet, maps):  # record the maps the guided step compares with
            P.reference_step(unet, maps, x, t, emb, idx, guidance_scale=7.5)

        def cfg_step(x, t, emb):
            return S.cfg(S.unet_forward(unet, torch.cat([x] * 2), t, emb), 7.5)

        def reference(x, t, emb, ref_maps=ref_maps):
            return P.reference_step(unet, ref_maps, x, t, emb, idx, guidance_scale=7.5)

        def guided(x, t, emb, maps=maps):
            return P.cross_attention_guided_step(unet, maps, x, t, emb, idx, amount=0.1, guidance_scale=7.5)[
                0
            ]

        reg = P.Regularizer()
        alpha = torch.tensor(0.5, device=device)
        shifts = P.draw_roll_shifts(tuple(x.shape), g, reg.num_draws).to(device)

        def unet_pass(x, t, emb, n=n):
            return S.unet_forward(unet, x, t, emb[n:])

        def regularizer(x, t, emb, alpha=alpha, shifts=shifts):
            return P.regularize_noise_pred(x, x, alpha, "epsilon", shifts=shifts)

        def invert(x, t, emb, n=n, alpha=alpha, shifts=shifts, reg=reg):
            return P.inversion_step(
                unet,
                x,
                t,
                emb[n:],
                alpha,
                shifts,
                guidance_scale=1.0,
                regularizer=reg,
                prediction_type="epsilon",
            )

        steps = {
            "cfg": cfg_step, "reference": reference, "guided": guided, "unet": unet_pass,
            "regularizer": regularizer, "invert": invert,
        }  # fmt: skip
        flops: dict[str, int | None] = {}
        for name in args.steps.split(","):
            try:
                with (
                    P.attention_maps(unet, maps if name == "guided" else ref_maps),
                    FlopCounterMode(display=False) as fc,
                ):
                    steps[name](x, t, emb)
                flops[name] = fc.get_total_flops()
            except RuntimeError:  # the counter cannot follow autograd.grad(inputs=...) (the guided step)
                flops[name] = None
        for spec in args.variants.split(","):
            mode, *flags = spec.split("+")
            if device.type != "cuda" and mode == "graphs":
                mode = "eager"
            if "bench" in flags:
                torch.backends.cudnn.benchmark = True
            fmt = torch.channels_last if "cl" in flags else torch.contiguous_format
            unet.to(memory_format=fmt)
            options = {k: v for f, (k, v) in _INDUCTOR_FLAGS.items() if f in flags}
            sdpa = _sdpa_backends(flags)
            fused = P.FusedProjections(unet) if "qkv" in flags else None
            for name in args.steps.split(","):
                runner = S.UNetRunner(mode, compile_kwargs={"options": options} if options else {})
                fn = steps[name]
                label = f"{spec}/{name}/b{n}"
                try:
                    with P.attention_maps(unet, maps if name == "guided" else ref_maps, fused), sdpa():
                        sync(device)
                        t0 = time.perf_counter()
                        out = runner(name, fn, x, t, emb)
                        sync(device)
                        first = time.perf_counter() - t0
                        times = []
                        for _ in range(args.reps):
                            t0 = time.perf_counter()
                            out = runner(name, fn, x, t, emb)
                            sync(device)
                            times.append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - report and go on
                    rows[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(label, "FAILED", rows[label]["error"], flush=True)
                    continue
                med = statistics.median(times)
                f = flops[name]
                row = {
                    "first_s": first, "median_ms": 1000 * med, "images": n,
                    "gflop": None if f is None else f / 1e9, "tflop_per_s": None if f is None else f / med / 1e12,
                }  # fmt: skip
                if (name, n) in base_out:
                    row["max_abs_diff_vs_first_variant"] = float(
                        (out.float() - base_out[name, n]).abs().max()
                    )
                else:
                    base_out[name, n] = out.float()
                rows[label] = row
                print(label, json.dumps(row), flush=True)
                runner.clear()
    unet.to(memory_format=torch.contiguous_format)
    print("\n| variant | step | images | first call s | median ms | ms per image | TFLOP/s | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, r in rows.items():
        v, s, b = k.split("/")
        if "error" in r:
            print(f"| {v} | {s} | {b[1:]} | failed: {r['error'][:80]} | | | | |")
        else:
            d = r.get("max_abs_diff_vs_first_variant")
            tf = "-" if r["tflop_per_s"] is None else f"{r['tflop_per_s']:.0f}"
            print(
                f"| {v} | {s} | {r['images']} | {r['first_s']:.2f} | {r['median_ms']:.2f} | "
                f"{r['median_ms'] / r['images']:.2f} | {tf} | "
                f"{'-' if d is None else f'{d:.2e}'} |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
