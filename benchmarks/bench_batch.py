"""Benchmark `p2pz batch`: images per second for 64 jobs, batch sizes 1 / 4 / 8 against a loop of
single edits, and N processes (one per GPU, through accelerate) against one.

Model: an SD-1.4-sized UNet / VAE / CLIP ViT-L text tower with random weights (small std, so 50
float16 steps stay finite; the work per step does not depend on the values), saved once to a temp
folder and loaded back with ``from_pretrained`` by every process, as a user's model would be.
Concepts ``cat`` / ``dog`` with random embeddings for its text encoder go into a temp registry.
Inputs: 64 jobs = ``--images`` drawn pictures x ``--seeds`` seeds, one direction, SDEdit (the
cheapest editor; ``--editor`` picks another) at ``--strength`` 0.75, ``--steps`` 50, 512x512.

Measured, one process (the editor warm: weights loaded and one edit done before the clock starts):

- ``loop``: ``for job: ed.edit(image, direction, seed=s).image.save(png)``, what a user script does;
- ``batch b=1|4|8``: `p2pz_directions.batch.run_jobs` on the same jobs (background load/save,
  batched calls where the editor takes lists and the batch was proven equal to single edits: the
  ``batched`` column says how many images went per call).

Then ``--gpus 1,2``: the same 64 jobs as a fresh run in fresh processes, one per GPU, through
``accelerate launch`` (one process: started directly): wall seconds from start to the merged table
(process start and model load included) and the images/s of the editing phase summed over the
processes; scaling = that rate over the one-process rate.

Usage::

    python benchmarks/bench_batch.py --json results/batch_h100.json                 # one GPU
    python benchmarks/bench_batch.py --skip-single --gpus 1,2 --json results/batch_x2.json   # 2 GPUs
    python benchmarks/bench_batch.py --tiny                                          # CPU smoke (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

UNET_SD14 = dict(
    sample_size=64,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
VAE_SD14 = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def ensure_builtin_plugins() -> None:
    """Register the built-in editors where the package's entry points are not installed (the GPU
    machine runs from a checkout on PYTHONPATH)."""
    import importlib

    from p2pz_directions.editing import plugins

    have = plugins.editors()
    for name, module in (("pix2pix-zero", "pix2pix_zero"), ("diffedit", "diffedit"), ("sdedit", "sdedit")):
        if name not in have:
            plugins.register(importlib.import_module(f"p2pz_plugins.{module}"), name=f"builtin-{name}")


def build_model(folder: Path, tiny: bool) -> Path:
    """Write a random-weight SD model (tiny, or SD-1.4-sized) to ``folder``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from p2pz_directions.editing.demo import make_components, make_tokenizer, sd_scheduler

    if tiny:
        comps = make_components("sd1", seed=0)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_SD14)
        vae = AutoencoderKL(**VAE_SD14)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in (unet, vae):
                for p in m.parameters():
                    if p.dim() > 1:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        te = CLIPTextModel(
            CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, projection_dim=768, **CLIP_L)
        )
        sched = sd_scheduler()
        comps = {"unet": unet.half(), "vae": vae.half(), "text_encoder": te.half(), "scheduler": sched}
    pipe = StableDiffusionPipeline(
        **comps,
        tokenizer=make_tokenizer(folder / "tokenizer"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder


def publish_concepts(model: Path) -> None:
    from p2pz_directions.core.concept import Concept
    from p2pz_directions.core.store import LocalStore
    from p2pz_directions.editing.models import encoder_for

    enc = encoder_for(model=str(model))
    g = torch.Generator().manual_seed(0)
    store = LocalStore()
    for name in ("cat", "dog"):
        store.publish(Concept(name, torch.randn(77, enc.hidden_size, generator=g) * 0.1, enc))


def draw_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, size)
    for i in range(n):
        rng = np.random.default_rng(i)
        base = np.stack(
            [
                ramp[None, :].repeat(size, 0),
                ramp[:, None].repeat(size, 1),
                np.full((size, size), 40.0 * i % 255),
            ],
            -1,
        )
        arr = np.clip(base * 0.7 + rng.random((size, size, 3)) * 70, 0, 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")


def plan_for(args: argparse.Namespace, images: Path, model: Path):
    from p2pz_directions import batch

    return batch.plan_jobs(
        images,
        directions=["cat->dog"],
        seeds=list(range(args.seeds)),
        editor=args.editor,
        model=str(model),
        options=options_for(args),
    )


def options_for(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"prompt": "a photo of a cat", "num_inference_steps": args.steps}
    if args.editor == "sdedit":
        opts["strength"] = args.strength
    return opts


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- one process, a warm editor --------------------------------------------------------------------------
def bench_single_process(args, model: Path, images: Path, work: Path) -> dict[str, Any]:
    from PIL import Image

    from p2pz_directions import batch, editors

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.float16
    plan = plan_for(args, images, model)
    ed = editors.get(args.editor, model=str(model), device=device, dtype=dtype)
    d = ed.resolve_direction("cat->dog")
    opts = plan[0].options
    first = Image.open(plan[0].input.source).convert("RGB")
    ed.edit(first, d, seed=0, **opts)  # warm: weights, kernels, CUDA graphs
    out: dict[str, Any] = {}

    loop_dir = work / "loop"
    loop_dir.mkdir()
    sync()
    t0 = time.perf_counter()
    for j in plan:
        img = Image.open(j.input.source).convert("RGB")
        ed.edit(img, d, seed=j.seed, **opts).image.save(loop_dir / f"{j.id}.png")
    sync()
    dt = time.perf_counter() - t0
    out["loop"] = {"seconds": round(dt, 3), "images_per_s": round(len(plan) / dt, 3), "batched": 1}
    print(f"loop: {len(plan)} images in {dt:.1f} s", flush=True)

    def vs_loop(rep) -> int | None:
        diffs = [
            int(np.abs(np.asarray(Image.open(dst / r["file_name"]), dtype=np.int16)
                       - np.asarray(Image.open(loop_dir / f"{r['job_id']}.png"), dtype=np.int16)).max())
            for r in rep.records
            if not r["error"]
        ]  # fmt: skip
        return max(diffs) if diffs else None

    for bs in args.batch_sizes:
        variants = [(f"batch b={bs}", True)]
        for name, checked in variants:
            dst = work / name.replace(" ", "_").replace("=", "")
            sync()
            t0 = time.perf_counter()
            rep = batch.run_jobs(
                plan, dst, batch_size=bs, device=device, dtype=dtype, editors={args.editor: ed}, progress=False,
                check_batch=checked, batch_tolerance=args.batch_tolerance,
            )  # fmt: skip
            sync()
            dt = time.perf_counter() - t0
            per_call = max((r["batch_size"] or 1) for r in rep.records) if rep.records else 0
            out[name] = {
                "seconds": round(dt, 3),
                "images_per_s": round(rep.done / dt, 3),
                "batched": per_call,
                "failed": rep.failed,
                "max_abs_diff_vs_loop": vs_loop(rep),
                "notes": rep.notes,
            }
            print(f"{name}: {rep.done} images in {dt:.1f} s ({per_call} per call) {rep.notes}", flush=True)
            if checked and bs > 1 and per_call == 1 and any("differs" in n for n in rep.notes):
                variants.append((f"batch b={bs} unchecked", False))  # what batching would give
    return out


# -- N processes -----------------------------------------------------------------------------------------
def bench_processes(args, model: Path, images: Path, work: Path, home: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base_rate = None
    for n in args.gpus:
        dst = work / f"gpus{n}"
        worker = [
            str(Path(__file__).resolve()), "--worker", "--model", str(model), "--images", str(images),
            "--out", str(dst), "--editor", args.editor, "--steps", str(args.steps), "--strength", str(args.strength),
            "--seeds", str(args.seeds), "--batch-size", str(args.worker_batch_size),
        ] + (["--tiny"] if args.tiny else [])  # fmt: skip
        if n == 1:
            cmd = [sys.executable, *worker]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *worker]  # fmt: skip
        env = dict(
            os.environ,
            P2PZ_HOME=str(home),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        if args.tiny:
            env["OMP_NUM_THREADS"] = "1"
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            out[f"{n} process(es)"] = {"error": proc.stderr[-2000:]}
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        rep = json.loads((dst / "bench-report.json").read_text("utf-8"))
        rate = sum(dv["images_per_s"] for dv in rep["devices"])
        base_rate = rate if n == 1 else base_rate
        out[f"{n} process(es)"] = {
            "wall_seconds": round(wall, 2),
            "images_per_s_editing": round(rate, 3),
            "scaling": round(rate / base_rate, 3) if base_rate else None,
            "devices": rep["devices"],
            "done": rep["done"],
            "failed": rep["failed"],
        }
        print(
            f"{n} process(es): {rep['done']} images, {wall:.1f} s wall, {rate:.2f} images/s editing",
            flush=True,
        )
    return out


def worker_main(args) -> int:
    """What each process runs (under accelerate launch for N > 1)."""
    ensure_builtin_plugins()
    from p2pz_directions import batch

    plan = plan_for(args, Path(args.images), Path(args.model))
    rep = batch.run_jobs(
        plan,
        args.out,
        batch_size=args.batch_size,
        device="cpu" if args.tiny else None,
        dtype=torch.float32 if args.tiny else torch.float16,
        progress=False,
    )
    if rep.is_main:
        (Path(args.out) / "bench-report.json").write_text(json.dumps(rep.to_dict()), "utf-8")
    return 0


def print_table(results: dict[str, Any]) -> None:
    rows = results.get("single_process", {})
    if rows:
        loop = rows.get("loop", {}).get("images_per_s")
        print("\n| run | images/s | per call | vs loop | max abs diff vs loop (levels) |")
        print("| --- | --- | --- | --- | --- |")
        for name, r in rows.items():
            if "images_per_s" in r:
                vs = f"{r['images_per_s'] / loop:.2f}x" if loop else "-"
                diff = r.get("max_abs_diff_vs_loop", 0 if name == "loop" else "-")
                print(f"| {name} | {r['images_per_s']:.3f} | {r.get('batched', '-')} | {vs} | {diff} |")
    procs = results.get("processes", {})
    if procs:
        print("\n| processes | wall s | images/s (editing, summed) | scaling |\n| --- | --- | --- | --- |")
        for name, r in procs.items():
            if "error" in r:
                print(f"| {name} | error | - | - |")
            else:
                print(f"| {name} | {r['wall_seconds']} | {r['images_per_s_editing']:.3f} | {r['scaling']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke test)")
    ap.add_argument("--editor", default="sdedit")
    ap.add_argument("--images", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-images", type=int, default=None, help="input images (default 32; tiny 4)")
    ap.add_argument(
        "--seeds", type=int, default=None, help="seeds per image (default 2): jobs = images x seeds"
    )
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; tiny 4)")
    ap.add_argument("--strength", type=float, default=0.75)
    ap.add_argument("--size", type=int, default=None, help="image side (default 512; tiny 32)")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--batch-tolerance", type=int, default=0, help="levels a batched edit may differ (0)")
    ap.add_argument(
        "--gpus", default=None, help="process counts to compare, e.g. 1,2 (default: 1,2 when 2+ GPUs)"
    )
    ap.add_argument("--skip-single", action="store_true", help="only the process comparison")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--batch-size", dest="worker_batch_size", type=int, default=8, help="batch size of the process runs"
    )
    args = ap.parse_args(argv)
    args.seeds = args.seeds or 2
    args.steps = args.steps or (4 if args.tiny else 50)
    if args.worker:
        args.batch_size = args.worker_batch_size
        return worker_main(args)
    args.n_images = args.n_images or (4 if args.tiny else 32)
    args.size = args.size or (32 if args.tiny else 512)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    n_gpu = torch.cuda.device_count()
    if args.gpus is None:
        args.gpus = "1,2" if (n_gpu >= 2 or args.tiny) else ""
    args.gpus = [int(g) for g in args.gpus.split(",") if g]
    if not args.tiny and n_gpu == 0:
        print("no GPU: run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="p2pz-bench-batch-"))
    home = work / "registry"
    os.environ["P2PZ_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.tiny:
        torch.set_num_threads(1)
    ensure_builtin_plugins()
    try:
        t0 = time.perf_counter()
        model = build_model(work / "model", args.tiny)
        publish_concepts(model)
        images = work / "images"
        draw_images(images, args.n_images, args.size)
        print(f"model and {args.n_images} images ready in {time.perf_counter() - t0:.1f} s", flush=True)
        results: dict[str, Any] = {
            "config": {k: v for k, v in vars(args).items() if k not in ("worker", "model", "out", "images")},
            "jobs": args.n_images * args.seeds,
            "device": torch.cuda.get_device_name(0) if n_gpu else platform.processor() or "cpu",
            "gpus": n_gpu,
            "torch": torch.__version__,
        }
        if not args.skip_single:
            results["single_process"] = bench_single_process(args, model, images, work)
        if args.gpus:
            results["processes"] = bench_processes(args, model, images, work, home)
        print_table(results)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2), "utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
