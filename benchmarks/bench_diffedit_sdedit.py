"""Benchmark the DiffEdit and SDEdit editors against diffusers' pipelines, in the same run.

Models: an SD-1.4-sized UNet (block channels 320/640/1280/1280, cross-attention 768), VAE
(128/256/512/512) and CLIP ViT-L/14 text tower (768 wide, 12 layers), random weights, float16,
built in memory from the configs below (nothing is downloaded). Both sides share the very same
modules: the diffusers pipelines are built from them and our editors get them through ``pipe=``.
Weights are drawn with a small std (``--init small``, the default) so that 50 float16 steps of a
random network stay finite; the work per step, and so the timing, does not depend on the values.

One 512x512 image, 50 steps, one seeded CPU generator per run:

- **DiffEdit** (mask + invert + edit, anchor on an H100: 4.3 s). diffusers:
  ``generate_mask(source, target)`` -> ``invert(source)`` -> ``__call__(target, negative=source)``
  with the direction's concept embeddings as ``*_prompt_embeds``; ours: ``editors.get("diffedit",
  pipe=...).edit(image, direction, seed=0)``.
- **SDEdit** at strength 0.75 (anchor 1.45 s). diffusers: ``StableDiffusionImg2ImgPipeline`` with
  ``prompt_embeds = caption + delta``; ours: ``editors.get("sdedit", pipe=...).edit(image,
  direction, prompt_embeds=caption, strength=0.75, seed=0)``.

Ours runs with ``loops="eager"``, ``"graphs"`` (CUDA graphs, the default on CUDA) and, with
``--compile``, ``"compile"`` (torch.compile'd steps captured as CUDA graphs; ``first_run_s`` holds
the compiling run).

For each: median seconds over ``--repeats`` runs after ``--warmup`` runs, peak GPU memory
(``torch.cuda.max_memory_allocated``, weights included), and the max abs difference of the output
images (0..1) from diffusers' (plus, for DiffEdit, of the masks and inverted latents).

Usage::

    python benchmarks/bench_diffedit_sdedit.py --out results/bench_diffedit_sdedit.json   # GPU
    python benchmarks/bench_diffedit_sdedit.py --tiny --out /tmp/bench_de.json           # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pz_directions.core.concept import Concept, Direction, EncoderInfo  # noqa: E402


def ensure_builtin_plugins() -> None:
    """Register the built-in editors directly where the package's entry points are not installed
    (the GPU machine runs from a checkout on PYTHONPATH)."""
    import importlib

    from p2pz_directions.editing import plugins

    have = plugins.editors()
    for name, module in (("pix2pix-zero", "pix2pix_zero"), ("diffedit", "diffedit"), ("sdedit", "sdedit")):
        if name not in have:
            plugins.register(importlib.import_module(f"p2pz_plugins.{module}"), name=f"builtin-{name}")
    for info in plugins.plugin_report():
        if not info.ok:
            print(f"plugin {info.name}: {info.error}\n{getattr(info, 'detail', '')}", file=sys.stderr)


ANCHORS_H100 = {"diffedit": 4.3, "sdedit": 1.45}

UNET_SD14 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
VAE_SD14 = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408
)

UNET_TINY = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    latent_channels=4,
    sample_size=64,
)
CLIP_TINY = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000
)


# -- models, built locally ---------------------------------------------------------------------------
def clip_tokenizer(folder: Path):
    """A character-level CLIP tokenizer (every prompt is padded to 77 tokens either way)."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _small_init(module: torch.nn.Module, std: float) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_components(tiny: bool, device: str, dtype: torch.dtype, init: str, workdir: Path) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from p2pz_directions.editing.demo import sd_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(UNET_TINY if tiny else UNET_SD14))
    vae = AutoencoderKL(**(VAE_TINY if tiny else VAE_SD14))
    sizes = CLIP_TINY if tiny else CLIP_L
    text_encoder = CLIPTextModel(
        CLIPTextConfig(max_position_embeddings=77, projection_dim=sizes["hidden_size"], **sizes)
    )
    if init == "small":
        for m in (unet, vae):
            _small_init(m, 0.02)
    for m in (unet, vae, text_encoder):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    scheduler = sd_scheduler()
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(workdir / "tok"),
        scheduler=scheduler,
    )


def pipelines(comps: dict[str, Any]):
    from diffusers import (
        DDIMInverseScheduler,
        StableDiffusionDiffEditPipeline,
        StableDiffusionImg2ImgPipeline,
    )

    common = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    diffedit = StableDiffusionDiffEditPipeline(
        **comps, inverse_scheduler=DDIMInverseScheduler.from_config(comps["scheduler"].config), **common
    )
    img2img = StableDiffusionImg2ImgPipeline(**comps, **common)
    for p in (diffedit, img2img):
        p.set_progress_bar_config(disable=True)
    return diffedit, img2img


def test_image(size: int):
    from PIL import Image

    rng = np.random.RandomState(0)
    ramp = np.linspace(0, 255, size)
    base = np.stack(
        [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1
    )
    return Image.fromarray(np.clip(base * 0.7 + rng.rand(size, size, 3) * 70, 0, 255).astype("uint8"))


# -- timing -------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Median seconds over ``repeats`` after ``warmup`` runs, peak memory, and the last output."""
    out, first = None, []
    for _ in range(warmup):  # the first run captures the graphs (and, for loops="compile", compiles)
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        first.append(time.perf_counter() - t0)
    times = []
    peak = None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.startswith("cuda"):
            peak = max(peak or 0, torch.cuda.max_memory_allocated())
    return {
        "seconds": statistics.median(times),
        "seconds_all": [round(t, 4) for t in times],
        "peak_gb": None if peak is None else round(peak / 1e9, 3),
        "first_run_s": round(first[0], 3) if first else None,
        "_out": out,
    }


def run_variants(variants: dict[str, Any], device: str, warmup: int, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, fn in variants.items():
        try:
            results[name] = measure(fn, device, warmup, repeats)
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return results


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_once(fn, device: str) -> dict[str, Any]:
    """One more (warm) run under ``torch.profiler``: wall seconds, the GPU's busy seconds (kernels
    and copies, which one stream runs one after another), the host-side calls that wait for the GPU,
    and the ten CUDA ops that took longest. ``busy / wall`` well below 1 means the GPU waited for
    the host (launches, syncs, Python) - where a faster UNet would not help."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    busy, syncs, ops = 0.0, {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            busy += us
            ops[e.name] = ops.get(e.name, 0.0) + us
        elif any(e.name.startswith(c) for c in SYNC_CALLS):
            syncs[e.name] = syncs.get(e.name, 0) + 1
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:10]
    return {
        "wall_s": round(wall, 4),
        "gpu_busy_s": round(busy / 1e6, 4),
        "busy_fraction": round(busy / 1e6 / wall, 3),
        "host_waits": syncs,
        "top_gpu_ops_ms": [(name[:80], round(us / 1e3, 2)) for name, us in top],
    }


def _np(x: Any) -> np.ndarray:
    return (
        x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    )


def _gap(a: Any, b: Any) -> tuple[float, float]:
    """(max, mean) absolute difference of two outputs."""
    d = np.abs(_np(a) - _np(b))
    return float(d.max()), float(d.mean())


def _variants(args, device: str, theirs, ours) -> dict[str, Any]:
    """diffusers, then ours per loop mode (eager unless --skip-eager; graphs on CUDA; compile with
    --compile), each also on --batch copies of the image in one call."""
    variants: dict[str, Any] = {"diffusers": theirs}
    loops = [] if args.skip_eager else [("ours", "eager")]
    if device.startswith("cuda"):
        loops.append(("ours_cuda_graphs", "graphs"))
    if args.compile:
        loops.append(("ours_compile", "compile"))
    for name, mode in loops:
        variants[name] = ours(mode)
        if args.batch > 1:
            variants[f"{name}_batch{args.batch}"] = ours(mode, args.batch)
    return variants


def _per_image(res: dict[str, Any], batch: int) -> None:
    """For each batched variant: seconds per image and its ratio to the same mode's one-image edit."""
    for name, r in res.items():
        single = res.get(name.removesuffix(f"_batch{batch}"), {})
        if name.endswith(f"_batch{batch}") and "seconds" in r and "seconds" in single:
            r["seconds_per_image"] = r["seconds"] / batch
            r["per_image_of_one"] = round(r["seconds_per_image"] / single["seconds"], 3)


def bench_diffedit(args, device: str, pipe, direction: Direction, image) -> dict[str, Any]:
    from p2pz_directions import editors

    steps = args.steps
    src, tgt = direction.source_embeds, direction.target_embeds
    ed = editors.get("diffedit", pipe=pipe, encoder=direction.encoder, device=device)

    def theirs():
        gen = torch.Generator().manual_seed(0)
        mask = pipe.generate_mask(
            image=image,
            source_prompt_embeds=src,
            target_prompt_embeds=tgt,
            num_inference_steps=steps,
            generator=gen,
        )
        inv = pipe.invert(image=image, prompt_embeds=src, num_inference_steps=steps, generator=gen).latents
        img = pipe(
            prompt_embeds=tgt,
            negative_prompt_embeds=src,
            mask_image=mask,
            image_latents=inv,
            num_inference_steps=steps,
            generator=gen,
            output_type="np",
        ).images[0]
        return {"image": img, "mask": mask[0], "inverted": inv}

    def ours(loops: str, batch: int = 1):
        def fn():
            res = ed.edit(
                image if batch == 1 else [image] * batch,
                direction,
                seed=0,
                num_inference_steps=steps,
                output_type="np",
                loops=loops,
            )
            return {
                "image": res.image if batch == 1 else res.images[0],
                "mask": res.extra["latent_mask"][0, 0],
                "inverted": res.inverted_latents[:1],
            }

        return fn

    variants = _variants(args, device, theirs, ours)
    res = run_variants(variants, device, args.warmup, args.repeats)
    _per_image(res, args.batch)
    _profile(args, device, variants, res)
    ref = res.get("diffusers", {}).get("_out")
    ref32 = _float32_reference(args, pipe, theirs)
    for name, r in res.items():
        out = r.pop("_out", None)
        if out is None:
            continue
        if ref32 is not None:  # the float32 run is the truth float16 rounding departs from
            r["max_abs_diff_image_vs_float32"], r["mean_abs_diff_image_vs_float32"] = _gap(
                out["image"], ref32["image"]
            )
            r["max_abs_diff_inverted_vs_float32"] = _gap(out["inverted"], ref32["inverted"])[0]
            r["mask_pixels_differing_vs_float32"] = float((_np(out["mask"]) != _np(ref32["mask"])).mean())
        if name == "diffusers" or ref is None:
            continue
        r["max_abs_diff_image"], r["mean_abs_diff_image"] = _gap(out["image"], ref["image"])
        r["mask_pixels_differing"] = float((_np(out["mask"]) != _np(ref["mask"])).mean())
        r["max_abs_diff_inverted"] = _gap(out["inverted"], ref["inverted"])[0]
        r["finite"] = bool(np.isfinite(_np(out["image"])).all())
    return res


def _profile(args, device: str, variants: dict[str, Any], res: dict[str, Any]) -> None:
    """With --profile: one more run of each CUDA variant under the profiler (`profile_once`)."""
    if not args.profile or not device.startswith("cuda"):
        return
    for name, fn in variants.items():
        if "error" not in res.get(name, {"error": 1}):
            try:
                res[name]["profile"] = profile_once(fn, device)
            except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the timings
                res[name]["profile"] = {"error": f"{type(e).__name__}: {e}"}


def _float32_reference(args, pipe, theirs) -> Any:
    """With --float32-reference: diffusers' run once more with every module in float32 (copies), the
    yardstick of "float16 noise": how far diffusers' own float16 run is from it."""
    if not args.float32_reference:
        return None
    import copy

    mods = {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder")}
    try:
        for k, m in mods.items():
            setattr(pipe, k, copy.deepcopy(m).float())
        return theirs()
    finally:
        for k, m in mods.items():
            setattr(pipe, k, m)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def bench_sdedit(args, device: str, pipe, direction: Direction, image) -> dict[str, Any]:
    from p2pz_directions import editors

    steps, strength = args.steps, args.strength
    with torch.no_grad():
        caption = pipe.encode_prompt("a photo of a cat", device, 1, False)[0]
    edited = caption + direction.delta.to(device=caption.device, dtype=caption.dtype)
    ed = editors.get("sdedit", pipe=pipe, encoder=direction.encoder, device=device)

    def theirs():
        gen = torch.Generator().manual_seed(0)
        return pipe(
            image=image,
            prompt_embeds=edited,
            strength=strength,
            num_inference_steps=steps,
            generator=gen,
            output_type="np",
        ).images[0]

    def ours(loops: str, batch: int = 1):
        def fn():
            res = ed.edit(
                image if batch == 1 else [image] * batch,
                direction,
                prompt_embeds=caption if batch == 1 else caption.repeat(batch, 1, 1),
                strength=strength,
                num_inference_steps=steps,
                seed=0,
                output_type="np",
                loops=loops,
            )
            return res.image if batch == 1 else res.images[0]

        return fn

    variants = _variants(args, device, theirs, ours)
    res = run_variants(variants, device, args.warmup, args.repeats)
    _per_image(res, args.batch)
    _profile(args, device, variants, res)
    ref = res.get("diffusers", {}).get("_out")
    ref32 = _float32_reference(args, pipe, theirs)
    for name, r in res.items():
        out = r.pop("_out", None)
        if out is None:
            continue
        if ref32 is not None:
            r["max_abs_diff_image_vs_float32"], r["mean_abs_diff_image_vs_float32"] = _gap(out, ref32)
        if name == "diffusers" or ref is None:
            continue
        r["max_abs_diff_image"], r["mean_abs_diff_image"] = _gap(out, ref)
        r["finite"] = bool(np.isfinite(_np(out)).all())
    return res


def print_table(results: dict[str, Any], anchors: bool) -> None:
    rows = [
        (
            "task",
            "variant",
            "seconds",
            "first run s",
            "vs diffusers",
            "peak GB",
            "max abs diff",
            "per image / one",
            "anchor H100",
        )
    ]
    for task in ("diffedit", "sdedit"):
        res = results.get(task, {})
        base = res.get("diffusers", {}).get("seconds")
        for name, r in res.items():
            if "error" in r:
                rows.append((task, name, "error", "-", "-", "-", r["error"][:60], "-", "-"))
                continue
            speed = f"{base / r['seconds']:.2f}x" if base and name != "diffusers" else "-"
            diff = r.get("max_abs_diff_image")
            rows.append(
                (
                    task,
                    name,
                    f"{r['seconds']:.3f}",
                    "-" if r.get("first_run_s") is None else f"{r['first_run_s']:.2f}",
                    speed,
                    "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.2f}",
                    "-" if diff is None else f"{diff:.2e}",
                    str(r.get("per_image_of_one", "-")),
                    f"{ANCHORS_H100[task]:.2f}" if anchors and name == "diffusers" else "-",
                )
            )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    ensure_builtin_plugins()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny models (64x64, 4 steps)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None, help="image side (default 512; 64 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; 4 with --tiny)")
    ap.add_argument("--strength", type=float, default=0.75, help="SDEdit strength")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--init", choices=("small", "default"), default="small", help="weight init (see docstring)"
    )
    ap.add_argument("--only", choices=("diffedit", "sdedit"), default=None)
    ap.add_argument(
        "--compile",
        action="store_true",
        help='also time loops="compile" (first run compiles; see first_run_s)',
    )
    ap.add_argument("--batch", type=int, default=1, help="also edit this many images in one call")
    ap.add_argument("--skip-eager", action="store_true", help='skip loops="eager"')
    ap.add_argument(
        "--profile", action="store_true", help="one more run per CUDA variant under torch.profiler"
    )
    ap.add_argument(
        "--float32-reference",
        action="store_true",
        help="also run diffusers in float32 and report every variant's distance from it (float16 noise)",
    )
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    args.size = args.size or (64 if args.tiny else 512)
    args.steps = args.steps or (4 if args.tiny else 50)
    if args.tiny:
        args.repeats = min(args.repeats, 2)

    import diffusers

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        comps = build_components(args.tiny, device, dtype, args.init, Path(tmp))
    diffedit_pipe, img2img_pipe = pipelines(comps)
    build_s = time.perf_counter() - t0
    dim = comps["unet"].config.cross_attention_dim
    enc = EncoderInfo("bench/random-clip-text", dim, "clip")
    g = torch.Generator().manual_seed(0)
    direction = Direction(
        Concept("cat", torch.randn(77, dim, generator=g), enc),
        Concept("dog", torch.randn(77, dim, generator=g), enc),
    )
    image = test_image(args.size)

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "steps": args.steps,
        "sdedit_strength": args.strength,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "init": args.init,
        "tiny": args.tiny,
        "batch": args.batch,
        "build_seconds": round(build_s, 2),
        "anchors_h100_diffusers_seconds": ANCHORS_H100,
    }
    if args.only in (None, "diffedit"):
        results["diffedit"] = bench_diffedit(args, device, diffedit_pipe, direction, image)
    if args.only in (None, "sdedit"):
        results["sdedit"] = bench_sdedit(args, device, img2img_pipe, direction, image)

    print_table(results, anchors=not args.tiny)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
        print(f"wrote {args.out}")
    failed = [
        f"{t}/{n}" for t in ("diffedit", "sdedit") for n, r in results.get(t, {}).items() if "error" in r
    ]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
