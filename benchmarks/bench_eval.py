"""Scoring throughput of the built-in scorers alone (images per second), no editing.

Each scorer scores N (input, edit) pairs of 512x512 RGB images, the way ``p2pz eval`` calls it:
PIL images in, preprocessing (resize, crop, normalize) included, results back on the CPU. One
warm-up call, then the median of ``--repeats`` timed calls; also the model-only time (pixels
prepared beforehand) for CLIP and DINO. Models are random-weight ones of the paper's sizes (CLIP
ViT-B/32, DINO ViT-B/8), built here and loaded back through ``from_pretrained`` (nothing is
downloaded), unless ``--clip-model`` / ``--dino-model`` name real ones.

    python benchmarks/bench_eval.py --tiny --out /tmp/bench_eval.json      # CPU smoke test (~1 min)
    python benchmarks/bench_eval.py --out benchmarks/results/eval_h100.json  # GPU, fp16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pz_directions.eval.builtin import BackgroundSSIMScorer, ClipScorer, DinoStructureScorer  # noqa: E402
from p2pz_directions.eval.tiny import make_tiny_clip, make_tiny_dino  # noqa: E402


def make_clip_b32(path: Path) -> Path:
    """CLIP ViT-B/32 sizes (vision 768 x 12, patch 32, 224 px; text 512 x 12; projection 512), random."""
    from transformers import CLIPConfig, CLIPModel

    from p2pz_directions.editing.demo import make_tokenizer

    tok = make_tokenizer(path)
    cfg = CLIPConfig(
        text_config={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_attention_heads": 8,
            "num_hidden_layers": 12,
            "vocab_size": 49408,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.eos_token_id,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=512,
    )
    CLIPModel(cfg).eval().save_pretrained(str(path))
    from p2pz_directions.eval.tiny import _processor

    _processor(path, "CLIPImageProcessor", 224, crop=True)
    return path


def make_dino_b8(path: Path) -> Path:
    """DINO ViT-B/8 sizes (768 x 12 layers, 12 heads, patch 8, 224 px: 785 tokens), random."""
    from transformers import ViTConfig, ViTModel

    from p2pz_directions.eval.tiny import _processor

    path.mkdir(parents=True, exist_ok=True)
    cfg = ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=8,
        qkv_bias=True,
    )
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(str(path))
    _processor(path, "ViTImageProcessor", 224, crop=False)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny models and small images")
    ap.add_argument("--n", type=int, default=None, help="pairs per call (default 64; 8 with --tiny)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 512; 64 with --tiny)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float16 (GPU default) | float32")
    ap.add_argument("--clip-model", default=None)
    ap.add_argument("--dino-model", default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="scorer batch size (default: the scorer's)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("float16" if device.type == "cuda" else "float32")
    ]
    n = args.n or (8 if args.tiny else 64)
    size = args.size or (64 if args.tiny else 512)
    if device.type == "cpu":
        torch.set_num_threads(
            max(1, min(torch.get_num_threads(), 2 if args.tiny else torch.get_num_threads()))
        )
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    if args.tiny:
        clip_dir = args.clip_model or str(make_tiny_clip(tmp / "clip"))
        dino_dir = args.dino_model or str(make_tiny_dino(tmp / "dino"))
    else:
        clip_dir = args.clip_model or str(make_clip_b32(tmp / "clip"))
        dino_dir = args.dino_model or str(make_dino_b8(tmp / "dino"))

    rng = np.random.default_rng(0)
    inputs = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    edits = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    masks = [Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255) for _ in range(n)]
    texts = {"source_texts": ["a photo of a cat"] * n, "target_texts": ["a photo of a dog"] * n}

    results: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "pairs_per_call": n,
        "image_size": size,
        "repeats": args.repeats,
        "tiny": args.tiny,
        "weights": "given"
        if (args.clip_model or args.dino_model)
        else "random (paper sizes)"
        if not args.tiny
        else "tiny",
        "scorers": {},
    }
    import transformers

    results["transformers"] = transformers.__version__
    scorers = [
        ClipScorer(clip_dir, device=device, dtype=dtype),
        DinoStructureScorer(dino_dir, device=device, dtype=dtype),
        BackgroundSSIMScorer(device=device, dtype=dtype),
    ]
    for s in scorers:
        if args.batch_size:
            s.batch_size = args.batch_size
        med, times = timed(lambda s=s: s.score(inputs, edits, masks=masks, **texts), args.repeats, device)
        row = {
            "model": s.model_id,
            "seconds_per_call": med,
            "pairs_per_second": n / med,
            "images_per_second": 2 * n / med if s.name != "background-ssim" else n / med,
            "times": times,
        }
        if s.name == "clip":
            px = s._pre(inputs, device, dtype)

            def model_only(s=s, px=px):
                with torch.inference_mode():
                    for i in range(0, px.shape[0], s.batch_size):
                        s._model.visual_projection(
                            s._model.vision_model(pixel_values=px[i : i + s.batch_size]).pooler_output
                        )

            m, _ = timed(model_only, args.repeats, device)
            row["model_only_images_per_second"] = n / m
        if s.name == "dino-structure":
            px = s._pre(inputs, device, dtype)

            def model_only(s=s, px=px):
                with torch.inference_mode():
                    for i in range(0, px.shape[0], s.batch_size):
                        s._model(pixel_values=px[i : i + s.batch_size])

            m, _ = timed(model_only, args.repeats, device)
            row["model_only_images_per_second"] = n / m
        if device.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            torch.cuda.reset_peak_memory_stats(device)
        results["scorers"][s.name] = row

    print(
        f"\n{results['device']}, {results['dtype']}, {n} pairs of {size}x{size} per call, median of {args.repeats}\n"
    )
    print("| scorer | model | s / call | images/s (end to end) | images/s (model only) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results["scorers"].items():
        mo = r.get("model_only_images_per_second")
        print(
            f"| {name} | {Path(str(r['model'])).name if r['model'] else '-'} | {r['seconds_per_call']:.3f} | "
            f"{r['images_per_second']:.1f} | {'-' if mo is None else f'{mo:.1f}'} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str), "utf-8")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
