"""Benchmark the ``ledits`` editor against diffusers' LEditsPPPipelineStableDiffusion, in the same run.

Models: SD-1.4-sized UNet, VAE and CLIP text tower with random weights in float16, built in memory
(`bench_diffedit_sdedit.build_components`; nothing is downloaded). Both sides share the very same
modules: diffusers' pipeline is built from them, our editor gets them through ``pipe=``. The
scheduler is the 2nd-order SDE DPM-Solver++ (what diffusers' LEDITS++ switches SD 1.4's PNDM to).

One 512x512 image, ``--steps`` inversion steps (default 50) after ``--skip`` (0.1), ``--directions``
directions (default 1: two edit concepts, "add b, remove a"), the default intersect mask on:

- diffusers: ``invert(image, num_inversion_steps, skip, generator)`` then ``__call__`` with the
  concepts as ``editing_prompt_embeds`` (its masks fail on embeddings as shipped, for want of token
  counts; the benchmark's `EmbedsLEdits` supplies the count diffusers computes for any prompt, 75);
- ours: ``editors.get("ledits", pipe=...).edit(image, directions, seed=0, ...)``, eager and with
  CUDA graphs (the default on CUDA).

Reported: median seconds over ``--repeats`` after ``--warmup`` runs, peak GPU memory, and the max
abs difference of the output images (0..1) from diffusers'.

Usage::

    python benchmarks/bench_ledits.py --out results/ledits.json     # GPU
    python benchmarks/bench_ledits.py --tiny                          # CPU smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_diffedit_sdedit import build_components, measure, test_image  # noqa: E402

from p2pz_directions.core.concept import Concept, Direction, EncoderInfo  # noqa: E402

UNET_TINY_3 = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)


def ensure_ledits_plugin() -> None:
    """Register the editor directly where the package's entry points are not installed."""
    from p2pz_directions.editing import plugins

    if "ledits" not in plugins.editors():
        plugins.register(importlib.import_module("p2pz_plugins.ledits"), name="builtin-ledits")


def embeds_pipeline(comps: dict[str, Any]):
    """diffusers' LEDITS++ pipeline; with ``editing_prompt_embeds`` its ``encode_prompt`` also returns
    the token counts (75 each, what it computes for any prompt) that its masks need."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    class EmbedsLEdits(LEditsPPPipelineStableDiffusion):
        def encode_prompt(self, *args, **kw):
            edit, neg, tokens = super().encode_prompt(*args, **kw)
            if tokens is None and kw.get("editing_prompt_embeds") is not None:
                tokens = torch.full((kw["editing_prompt_embeds"].shape[0],), neg.shape[1] - 2)
            return edit, neg, tokens

    comps = dict(comps)
    comps["scheduler"] = DPMSolverMultistepScheduler.from_config(
        comps["scheduler"].config, algorithm_type="sde-dpmsolver++", solver_order=2
    )
    pipe = EmbedsLEdits(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_directions(n: int, hidden: int) -> list[Direction]:
    enc = EncoderInfo("bench/clip", hidden, "bench")
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        a = Concept(f"a{i}", torch.randn(77, hidden, generator=g) * 0.5, enc)
        b = Concept(f"b{i}", torch.randn(77, hidden, generator=g) * 0.5, enc)
        out.append(Direction(a, b))
    return out


def _np(x: Any) -> np.ndarray:
    return (
        x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="inversion steps (50; tiny: 4)")
    ap.add_argument("--skip", type=float, default=0.1)
    ap.add_argument("--size", type=int, default=None, help="image side (512; tiny: 64)")
    ap.add_argument("--directions", type=int, default=1)
    ap.add_argument("--no-mask", action="store_true", help="use_intersect_mask=False on both sides")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--init", choices=["small", "default"], default="small")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.float16
    steps = args.steps or (4 if args.tiny else 50)
    size = args.size or (64 if args.tiny else 512)
    if args.tiny:
        torch.set_num_threads(1)
    ensure_ledits_plugin()
    from diffusers import UNet2DConditionModel

    from p2pz_directions import editors

    with tempfile.TemporaryDirectory() as tmp:
        comps = build_components(args.tiny, device, dtype, args.init, Path(tmp))
    if args.tiny:
        torch.manual_seed(0)
        comps["unet"] = UNet2DConditionModel(**UNET_TINY_3).to(device=device, dtype=dtype).eval()
    pipe = embeds_pipeline(comps)
    hidden = comps["text_encoder"].config.hidden_size
    dirs = random_directions(args.directions, hidden)
    image = test_image(size)
    masks = not args.no_mask
    rows = torch.stack([c.embedding for d in dirs for c in (d.target, d.source)]).to(
        device=device, dtype=dtype
    )
    n_concepts = rows.shape[0]

    def theirs():
        pipe.invert(
            image, num_inversion_steps=steps, skip=args.skip, generator=torch.Generator().manual_seed(0)
        )
        extra = {"editing_prompt": [f"c{i}" for i in range(n_concepts)]} if masks else {}
        return pipe(
            editing_prompt_embeds=rows,
            reverse_editing_direction=[False, True] * len(dirs),
            use_intersect_mask=masks,
            output_type="np",
            **extra,
        ).images[0]

    ed = editors.get("ledits", pipe=pipe, encoder=dirs[0].encoder, device=device)

    def ours(graphs: bool):
        def fn():
            res = ed.edit(
                image, dirs, seed=0, num_inversion_steps=steps, skip=args.skip, use_intersect_mask=masks,
                output_type="np", cuda_graphs=graphs,
            )  # fmt: skip
            return res.image

        return fn

    variants = {"diffusers": theirs, "ours_eager": ours(False)}
    if device == "cuda":
        variants["ours_cuda_graphs"] = ours(True)
    results: dict[str, Any] = {}
    for name, fn in variants.items():
        try:
            results[name] = measure(fn, device, args.warmup, args.repeats)
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    ref = results.get("diffusers", {}).pop("_out", None)
    base = results.get("diffusers", {}).get("seconds")
    for r in results.values():
        out = r.pop("_out", None)
        if out is not None and ref is not None:
            r["max_abs_diff"] = float(np.abs(_np(out) - _np(ref)).max())
            r["finite"] = bool(np.isfinite(_np(out)).all())
        if base and r.get("seconds"):
            r["speedup"] = round(base / r["seconds"], 2)
    report = {
        "benchmark": "ledits",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "tiny": args.tiny,
        "size": size,
        "inversion_steps": steps,
        "skip": args.skip,
        "directions": args.directions,
        "intersect_mask": masks,
        "torch": torch.__version__,
        "results": results,
    }
    print("| variant | seconds | peak GB | max abs diff | speed-up |\n| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | |")
            continue
        diff = r.get("max_abs_diff", 0.0)
        print(f"| {name} | {r['seconds']:.3f} | {r.get('peak_gb')} | {diff:.2e} | {r.get('speedup', 1.0)}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), "utf-8")
    return report


if __name__ == "__main__":
    main()
