"""Benchmark: our pix2pix-zero real-image edit (invert + edit) against diffusers' pipeline, same run.

Models: an SD-1.4-sized UNet (320/640/1280/1280 channels, cross-attention 768), VAE
(128/256/512/512) and CLIP ViT-L/14-sized text tower (768 wide, 12 layers), random weights,
built on the device from the configs below (nothing is downloaded). Both sides use the very same
modules: diffusers' ``StableDiffusionPix2PixZeroPipeline`` is built from them and our editor gets
them through ``pipe=``. Weights are drawn with a small std (``--init small``, default) so that
float16 sampling of a random network stays finite; the work per step does not depend on the values.

One 512x512 image, 50 steps, float16, the same seeded CPU generator for both:

- diffusers: ``pipe.invert(caption, image, generator=g)`` then ``pipe(caption, source_embeds,
  target_embeds, latents=inverted, negative_prompt=caption, generator=g)``
  (anchor on an H100: 14.0 s + 12.5 s = 26.4 s, 9.6 GB);
- ours: ``Pix2PixZeroEditor(pipe=pipe).edit(image, direction, prompt=caption, generator=g)`` with
  ``loops="eager"`` and ``loops="graphs"`` (CUDA graphs captured on the first edit and replayed).

Reported per variant: median seconds per edit over ``--repeats`` runs after one warm-up run (the
first, graph-capturing edit is reported on its own), peak GPU memory
(``torch.cuda.max_memory_allocated`` during the timed runs, weights included), and the max abs
difference of the output image (0..1) from diffusers'. Correctness itself is proven by the CPU
equality tests (tests/test_pix2pix_zero.py); here float16 and a different attention kernel make
small differences expected.

Usage::

    python benchmarks/bench_pix2pix_zero.py --json results.json      # GPU, SD-1.4 sizes
    python benchmarks/bench_pix2pix_zero.py --tiny                   # CPU smoke test, tiny models
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

ANCHOR_H100 = {"seconds": 26.4, "invert": 14.0, "edit": 12.5, "peak_gb": 9.6}

UNET = {
    "sd14": dict(
        sample_size=64,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "tiny": dict(
        sample_size=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
}
VAE = {
    "sd14": dict(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512, scaling_factor=0.18215
    ),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=64),
}
CLIP = {
    "sd14": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=49408,
    ),
    "tiny": dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000
    ),
}


def char_tokenizer(folder: Path):
    """A CLIP tokenizer over characters: prompts are padded to 77 tokens either way."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_pipeline(size: str, device: torch.device, dtype: torch.dtype, init: str, workdir: Path):
    from diffusers import (
        AutoencoderKL,
        DDIMInverseScheduler,
        StableDiffusionPix2PixZeroPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from p2pz_directions.editing.demo import sd_scheduler

    torch.manual_seed(0)
    with device:  # initialise on the device: seconds instead of minutes for 860M parameters
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **UNET[size])
        down = ("DownEncoderBlock2D",) * len(VAE[size]["block_out_channels"])
        up = ("UpDecoderBlock2D",) * len(VAE[size]["block_out_channels"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=down,
            up_block_types=up,
            **VAE[size],
        )
        c = CLIP[size]
        text_encoder = CLIPTextModel(
            CLIPTextConfig(max_position_embeddings=77, projection_dim=c["hidden_size"], **c)
        )
    if init == "small":  # keep a random float16 network finite over 150 UNet passes
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for m in (unet, vae):
                for p in m.parameters():
                    if p.dim() > 1:
                        p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
    for m in (unet, vae, text_encoder):
        m.to(dtype=dtype).eval().requires_grad_(False)
    scheduler = sd_scheduler()
    pipe = StableDiffusionPix2PixZeroPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=char_tokenizer(workdir / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        feature_extractor=None,
        safety_checker=None,
        inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config),
        caption_generator=None,
        caption_processor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_picture(size: int, seed: int = 0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    ramp = np.linspace(0, 255, size)
    base = np.stack(
        [ramp[None].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1
    )
    return Image.fromarray(np.clip(base * 0.7 + rng.rand(size, size, 3) * 70, 0, 255).astype("uint8"))


def make_direction(pipe):
    """Concepts 'cat' / 'dog': mean text embeddings of a few template captions (as the builder does)."""
    from p2pz_directions.core.concept import Concept, Direction, EncoderInfo
    from p2pz_directions.sampling import encode_text as encode_prompt

    enc = EncoderInfo("bench/random-clip", pipe.text_encoder.config.hidden_size, "clip")
    cs = []
    for name in ("cat", "dog"):
        caps = [f"a photo of a {name}", f"a painting of a {name}", f"a {name} in the grass"]
        emb = encode_prompt(pipe.tokenizer, pipe.text_encoder, caps, pipe.device).float().mean(0)
        cs.append(Concept(name, emb.cpu(), enc))
    return Direction(*cs), enc


class Meter:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak_gb = torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None


def run_diffusers(pipe, image, d, caption, steps, xa, seed):
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    inv = pipe.invert(caption, image=image, num_inference_steps=steps, generator=g).latents
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = pipe(
        caption,
        source_embeds=d.source_embeds,
        target_embeds=d.target_embeds,
        num_inference_steps=steps,
        cross_attention_guidance_amount=xa,
        generator=g,
        latents=inv,
        negative_prompt=caption,
        output_type="np",
    ).images
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return out, {"invert_s": t1 - t0, "edit_s": time.perf_counter() - t1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None, help="default 50 (3 with --tiny)")
    ap.add_argument("--size", type=int, default=None, help="image side, default 512 (64 with --tiny)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--xa", type=float, default=0.1, help="cross_attention_guidance_amount")
    ap.add_argument("--init", choices=("small", "default"), default="small")
    ap.add_argument(
        "--variants",
        default=None,
        help="comma list of ours: graphs (CUDA graphs), eager, compile (torch.compile per step), eager-exact "
        "(explicit attention everywhere, as diffusers); '+creg' compiles the inversion regularizer; '+seq' runs "
        "the reference and edit passes one after the other (passes='sequential'; default: in step where "
        "the editor's auto says so); '+fast' turns on channels_last and cudnn.benchmark from that variant on, "
        "'+bench' cudnn.benchmark alone; '+norec' leaves the reconstruction undecoded "
        "(return_reconstruction=False: the work diffusers' pipeline does, which decodes the edit only); "
        "':N' sets its repeats",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=1,
        help="also time ours on this many different images edited as one batch (seconds per image reported)",
    )
    ap.add_argument("--diffusers-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    from p2pz_plugins.pix2pix_zero import Pix2PixZeroEditor

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size_name = "tiny" if args.tiny else "sd14"
    steps = args.steps or (3 if args.tiny else 50)
    side = args.size or (64 if args.tiny else 512)
    variants = (args.variants or ("graphs,eager" if device.type == "cuda" else "eager")).split(",")
    caption = "a photography of a cat sitting on the grass"

    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(size_name, device, dtype, args.init, Path(tmp))
    image = test_picture(side)
    d, enc = make_direction(pipe)
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "models": size_name,
        "image": f"{side}x{side}",
        "steps": steps,
        "repeats": args.repeats,
        "init": args.init,
    }
    import diffusers

    info["diffusers"] = diffusers.__version__
    results: dict[str, Any] = {"info": info, "variants": {}}
    print(json.dumps(info), flush=True)

    ref = None
    if not args.skip_diffusers:
        run_diffusers(pipe, image, d, caption, 2, args.xa, 0)  # warm-up (kernels, cuDNN plans)
        times, parts = [], []
        for _ in range(args.diffusers_repeats or args.repeats):
            with Meter(device) as m:
                ref, part = run_diffusers(pipe, image, d, caption, steps, args.xa, 0)
            times.append(m.seconds)
            parts.append(part)
        results["variants"]["diffusers"] = {
            "seconds": statistics.median(times),
            "all_seconds": times,
            "invert_s": statistics.median(p["invert_s"] for p in parts),
            "edit_s": statistics.median(p["edit_s"] for p in parts),
            "peak_gb": m.peak_gb,
            "nan": bool(np.isnan(ref).any()),
        }
        print("diffusers", json.dumps(results["variants"]["diffusers"]), flush=True)

    pipe.unet.requires_grad_(False)  # diffusers' prepare_unet leaves cross-attention weights trainable
    ed = Pix2PixZeroEditor(pipe=pipe, encoder=enc)
    phase_times: dict[str, float] = {}

    def phases(phase: str, step: int, total: int) -> None:
        # after the first step and at the end of each phase: wait for the GPU, note the time (6 syncs
        # per edit), so that each phase splits into its set-up + first step and its other steps
        if step in (1, total):
            if device.type == "cuda":
                torch.cuda.synchronize()
            phase_times[phase if step == total else phase + "@1"] = time.perf_counter()

    for spec in variants:
        # "graphs", "eager-exact", "graphs+fast" (channels_last + cudnn.benchmark from here on), ":N" repeats
        variant, _, reps = spec.partition(":")
        repeats = int(reps) if reps else args.repeats
        base, *flags = variant.split("+")
        if "fast" in flags:
            torch.backends.cudnn.benchmark = True
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            ed = Pix2PixZeroEditor(pipe=pipe, encoder=enc)  # fresh graph cache
        elif "bench" in flags:
            torch.backends.cudnn.benchmark = True
            ed = Pix2PixZeroEditor(pipe=pipe, encoder=enc)  # graphs captured with the benchmarked plans
        loops, attention = (base.split("-") + ["auto"])[:2]
        creg = "creg" in flags
        passes = "sequential" if "seq" in flags else "auto"
        rec = "norec" not in flags

        def ours(loops=loops, attention=attention, ed=ed, creg=creg, images=image, passes=passes, rec=rec):
            t0 = time.perf_counter()
            phase_times.clear()
            res = ed.edit(
                images, d, prompt=caption, num_inference_steps=steps, cross_attention_guidance_amount=args.xa,
                generator=torch.Generator().manual_seed(0), output_type="np", loops=loops, attention=attention,
                progress=phases, compile_regularizer=creg, passes=passes, return_reconstruction=rec,
            )  # fmt: skip
            img = res.image
            # in step, the reference and the edit end together: "reference_s" is then both passes
            marks, last = {"passes": res.extra["passes"]}, t0
            for ph in ("invert", "reference", "edit"):
                if ph in phase_times:
                    if ph + "@1" in phase_times:  # set-up + first step, then the mean of the later steps
                        first = phase_times[ph + "@1"]
                        marks[ph + "_to_first_step_s"] = first - last
                        marks[ph + "_ms_per_later_step"] = (
                            1000 * (phase_times[ph] - first) / max(1, steps - 1)
                        )
                    marks[ph + "_s"], last = phase_times[ph] - last, phase_times[ph]
            marks["decode_s"] = time.perf_counter() - last
            return img, marks

        try:
            with Meter(device) as first:
                out, first_marks = ours()
            times, m, marks = [], first, first_marks
            for _ in range(repeats):
                with Meter(device) as m:
                    out, marks = ours()
                times.append(m.seconds)
            times = times or [first.seconds]
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            results["variants"][f"ours-{variant}"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"ours-{variant} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        row = {
            "seconds": statistics.median(times),
            "all_seconds": times,
            "first_edit_s": first.seconds,
            "peak_gb": m.peak_gb,
            "first_edit_peak_gb": first.peak_gb,
            "phases_last_run": marks,
            "phases_first_run": first_marks,
            "nan": bool(np.isnan(out).any()),
        }
        if ref is not None:
            row["max_abs_diff_vs_diffusers"] = float(np.abs(out - ref).max())
            row["mean_abs_diff_vs_diffusers"] = float(np.abs(out - ref).mean())
            row["speedup_vs_diffusers"] = results["variants"]["diffusers"]["seconds"] / row["seconds"]
        results["variants"][f"ours-{variant}"] = row
        print(f"ours-{variant}", json.dumps(row), flush=True)
        if args.batch > 1 and repeats > 0:  # one batched sampler over several images, vs the single edit
            batch = [test_picture(side, seed=k) for k in range(args.batch)]
            ours(images=batch)  # warm-up (graphs for this batch size)
            btimes = []
            for _ in range(max(1, repeats)):
                with Meter(device) as bm:
                    bout, _ = ours(images=batch)
                btimes.append(bm.seconds)
            per_image = statistics.median(btimes) / args.batch
            brow = {
                "images": args.batch,
                "seconds": statistics.median(btimes),
                "seconds_per_image": per_image,
                "per_image_vs_single": per_image / row["seconds"],
                "peak_gb": bm.peak_gb,
                "nan": bool(np.isnan(bout).any()),
            }
            results["variants"][f"ours-{variant}-batch{args.batch}"] = brow
            print(f"ours-{variant}-batch{args.batch}", json.dumps(brow), flush=True)

    print("\n| variant | s / edit | first edit s | peak GB | max abs diff vs diffusers | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results["variants"].items():
        if "images" in r:
            print(
                f"| {name} | {r['seconds_per_image']:.3f} per image ({r['per_image_vs_single']:.2f} of one) | | | | |"
            )
            continue
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:60]} | | | | |")
            continue
        pk = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "-"
        diff = r.get("max_abs_diff_vs_diffusers")
        sp = r.get("speedup_vs_diffusers")
        print(
            f"| {name} | {r['seconds']:.3f} | {r.get('first_edit_s', float('nan')):.3f} | {pk} | "
            f"{'-' if diff is None else f'{diff:.2e}'} | {'-' if sp is None else f'{sp:.1f}x'} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
