"""Benchmark: what a user waits for — `p2pz edit` once, in a fresh process, start to PNG written.

A model folder of SD-1.4 sizes (random weights, float16, written with ``save_pretrained`` as a user's
local copy would be) and the concepts ``cat`` / ``dog`` for its text encoder (built with the templates
captioner) are prepared once, untimed. Then, each in a new Python process:

- ours: ``p2pz edit photo.png -d "cat->dog" --editor E --model DIR --prompt ... -o out.png`` for each
  editor, run ``--runs`` times. The first run on a machine also fills the persistent caches (compiled
  kernels under the p2pz cache dir); it is reported on its own, the later runs as a median.
- with ``--models auto,diffusers``, each editor also with ``P2PZ_MODELS=diffusers`` (diffusers' /
  transformers' model and scheduler classes instead of p2pz's lean ones), in the same run;
- diffusers (pix2pix-zero only; diffusers has no CLI): a script that imports diffusers, loads
  ``StableDiffusionPix2PixZeroPipeline.from_pretrained(DIR, torch_dtype=float16)`` onto the GPU, inverts
  and edits the same picture with the same embeddings, and writes the PNG.

Each of our runs also records where its time went (a per-phase breakdown: interpreter + imports,
loading the model, each sampling phase, writing the PNG), read from the editor's progress callback
by a small wrapper around the CLI's own entry point (`--child`). Also timed: ``p2pz --help``,
``p2pz list`` and ``p2pz show`` in fresh processes (the CLI start-up target: <= 0.5 s).

Usage::

    python benchmarks/bench_fresh_process.py --json $OUT/fresh.json        # GPU, SD-1.4 sizes
    python benchmarks/bench_fresh_process.py --tiny                         # CPU smoke test, tiny models
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CAPTION = "a photography of a cat sitting on the grass"


# ----------------------------------------------------------------------------------------------
# child processes
# ----------------------------------------------------------------------------------------------


def child_ours(argv: list[str]) -> int:
    """Run the real CLI entry point, noting when each phase of the edit starts and ends."""
    t_start = time.perf_counter()
    marks: list[tuple[str, float]] = [("python", t_start)]
    report = os.environ["P2PZ_BENCH_REPORT"]
    try:
        from p2pz_directions import cli  # noqa: F401  (the import the user pays for)

        marks.append(("imported cli", time.perf_counter()))
        from p2pz_directions import editors as _editors

        orig_load = _editors.Editor.load_components
        orig_progress = _editors.Editor.progress
        seen: set[str] = set()

        def load_components(self, *a, **kw):
            marks.append(("load start", time.perf_counter()))
            out = orig_load(self, *a, **kw)
            marks.append(("load end", time.perf_counter()))
            return out

        def progress(self, phase, step, total):
            if phase not in seen:
                seen.add(phase)
                marks.append((f"{phase} start", time.perf_counter()))
            if step == total:
                _sync()
                marks.append((f"{phase} end", time.perf_counter()))
            return orig_progress(self, phase, step, total)

        orig_class, orig_one = _editors.Editor._component_class, _editors.Editor._load_one

        def component_class(self, name, *a, **kw):  # the import of the component's library module
            out = orig_class(self, name, *a, **kw)
            marks.append((f"load: import {name} class", time.perf_counter()))
            return out

        def load_one(self, name, *a, **kw):  # from_pretrained (read, build, to the GPU)
            out = orig_one(self, name, *a, **kw)
            _sync()
            marks.append((f"load: {name}", time.perf_counter()))
            return out

        if os.environ.get("P2PZ_BENCH_DETAIL"):  # also time each graph capture, VAE pass and text encoding
            _detail_marks(marks)
        _editors.Editor.load_components = load_components
        _editors.Editor._component_class = component_class
        _editors.Editor._load_one = load_one
        _editors.Editor.progress = progress
        prof = None
        if os.environ.get("P2PZ_BENCH_PROFILE"):  # a cProfile of everything after the imports
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        try:
            rc = int(cli.main(argv) or 0)
        except SystemExit as e:
            rc = int(e.code or 0)
        if prof is not None:
            import pstats

            prof.disable()
            with open(os.environ["P2PZ_BENCH_PROFILE"], "w") as f:
                pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(60)
    finally:
        marks.append(("command returned", time.perf_counter()))
        Path(report).write_text(json.dumps({"t0": t_start, "marks": marks}))
    cli.end_process(rc)  # as the console script ends (fast exit once torch is loaded)
    return rc


def _detail_marks(marks: list[tuple[str, float]]) -> None:
    """Wrap the runner's graph capture, the lean VAE's encode / decode and the text encoding so each
    adds a pair of marks (synchronized): ``<what> start`` / ``<what> end``. The phase breakdown then
    shows what inside a sampling phase the first edit pays for."""
    from p2pz_directions import sampling as S
    from p2pz_directions.lean import vae as lean_vae
    from p2pz_directions.sampling import runner as R

    def wrap(owner: Any, attr: str, label: Callable[..., str]) -> None:
        orig = getattr(owner, attr)

        def timed(*a, **kw):
            what = label(*a, **kw)
            _sync()
            marks.append((f"{what} start", time.perf_counter()))
            out = orig(*a, **kw)
            _sync()
            marks.append((f"{what} end", time.perf_counter()))
            return out

        setattr(owner, attr, timed)

    wrap(R.UNetRunner, "_capture", lambda self, fn, inputs: f"capture {tuple(inputs[0].shape)}")
    wrap(lean_vae.LeanVAE, "encode", lambda self, x, *a, **k: f"vae encode {tuple(x.shape)}")
    wrap(lean_vae.LeanVAE, "decode", lambda self, z, *a, **k: f"vae decode {tuple(z.shape)}")
    wrap(S, "encode_text", lambda *a, **k: "encode text")


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def child_diffusers(model: str, image: str, embeds: str, out: str, steps: int, device: str) -> int:
    """The same edit with diffusers' pipeline, loaded from the same folder, in a fresh process."""
    t0 = time.perf_counter()
    import torch
    from diffusers import DDIMInverseScheduler, StableDiffusionPix2PixZeroPipeline
    from PIL import Image
    from safetensors.torch import load_file

    t_import = time.perf_counter()
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPix2PixZeroPipeline.from_pretrained(
        model,
        torch_dtype=dtype,
        inverse_scheduler=DDIMInverseScheduler.from_pretrained(model, subfolder="scheduler"),
        caption_generator=None,
        caption_processor=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    _sync()
    t_load = time.perf_counter()
    e = load_file(embeds)
    g = torch.Generator().manual_seed(0)
    photo = Image.open(image).convert("RGB")
    inv = pipe.invert(CAPTION, image=photo, num_inference_steps=steps, generator=g).latents
    _sync()
    t_inv = time.perf_counter()
    img = pipe(
        CAPTION,
        source_embeds=e["source"].to(device, dtype),
        target_embeds=e["target"].to(device, dtype),
        num_inference_steps=steps,
        cross_attention_guidance_amount=0.1,
        generator=g,
        latents=inv,
        negative_prompt=CAPTION,
    ).images[0]
    _sync()
    t_edit = time.perf_counter()
    img.save(out)
    t_end = time.perf_counter()
    print(
        json.dumps(
            {
                "import_s": t_import - t0,
                "load_s": t_load - t_import,
                "invert_s": t_inv - t_load,
                "edit_s": t_edit - t_inv,
                "save_s": t_end - t_edit,
            }
        )
    )
    return 0


# ----------------------------------------------------------------------------------------------
# preparation
# ----------------------------------------------------------------------------------------------


def prepare(work: Path, tiny: bool, device: str) -> dict[str, Any]:
    """Model folder, concepts for its encoder in a fresh P2PZ_HOME, a test picture, the embeddings."""
    import torch
    from bench_pix2pix_zero import build_pipeline, test_picture
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    p = build_pipeline("tiny" if tiny else "sd14", dev, dtype, "small", work)
    sd = StableDiffusionPipeline(
        vae=p.vae,
        text_encoder=p.text_encoder,
        tokenizer=p.tokenizer,
        unet=p.unet,
        scheduler=p.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    model = work / "model"
    sd.save_pretrained(model, safe_serialization=True)
    del p, sd
    side = 64 if tiny else 512
    photo = work / "photo.png"
    test_picture(side).save(photo)
    env = dict(os.environ, P2PZ_HOME=str(work / "home"))
    build = [sys.executable, "-m", "p2pz_directions.cli", "build", "cat", "dog", "--model", str(model)]
    build += ["--captioner", "templates", "--n", "16", "--near-duplicates", "off", "--device", device]
    r = subprocess.run(build, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"building the concepts failed: {r.stderr[-2000:]}")
    # the same embeddings for diffusers' side
    code = (
        "from p2pz_directions import directions; from safetensors.torch import save_file; import sys;"
        f"d = directions.load('cat->dog', model={str(model)!r});"
        "save_file({'source': d.source_embeds.contiguous(), 'target': d.target_embeds.contiguous()}, sys.argv[1])"
    )
    embeds = work / "embeds.safetensors"
    subprocess.run([sys.executable, "-c", code, str(embeds)], check=True, env=env)
    _ = save_file  # imported above so a missing safetensors fails here, not in a child
    return {
        "model": model,
        "photo": photo,
        "embeds": embeds,
        "env": env,
        "prepare_s": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def run_ours(
    prep: dict, editor: str, out: Path, steps: int, device: str, extra_env: dict, opts: list[str] = ()
) -> dict[str, Any]:
    report = out.with_suffix(".json")
    argv = ["edit", str(prep["photo"]), "-d", "cat->dog", "--editor", editor, "--model", str(prep["model"])]
    argv += ["--prompt", CAPTION, "--steps", str(steps), "--device", device, "-o", str(out), "--quiet"]
    for o in opts:
        argv += ["--opt", o]
    env = dict(prep["env"], P2PZ_BENCH_REPORT=str(report), **extra_env)
    t0 = time.perf_counter()  # CLOCK_MONOTONIC: the child's perf_counter reads the same clock
    r = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *argv],
        env=env,
        capture_output=True,
        text=True,
    )
    t_end = time.perf_counter()
    wall = t_end - t0
    row: dict[str, Any] = {"wall_s": wall, "rc": r.returncode}
    if r.returncode != 0 or not out.is_file():
        row["error"] = (r.stderr or r.stdout)[-2000:]
        return row
    rep = json.loads(report.read_text())
    marks = rep["marks"]
    # phases: time between consecutive marks, named by the later one; the interpreter's start (to the
    # child's first line) and its end (after the command returned: teardown, or the fast exit)
    phases = {"interpreter start": marks[0][1] - t0}
    for (_, a), (name, b) in zip(marks, marks[1:], strict=False):
        phases[name] = phases.get(name, 0.0) + (b - a)
    phases["interpreter end"] = t_end - marks[-1][1]
    row["phases"] = phases
    return row


def time_cli(prep: dict, runs: int) -> dict[str, float]:
    out = {}
    for args in (["--help"], ["list"], ["show", "cat->dog"]):
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "p2pz_directions.cli", *args],
                env=prep["env"],
                capture_output=True,
                check=False,
            )
            ts.append(time.perf_counter() - t0)
        out["p2pz " + " ".join(args)] = statistics.median(ts)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_ours(argv[1:])
    if argv[:1] == ["--child-diffusers"]:
        return child_diffusers(*argv[1:5], int(argv[5]), argv[6])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None, help="default 50 (3 with --tiny)")
    ap.add_argument(
        "--runs", type=int, default=3, help="fresh processes per editor (the first reported alone)"
    )
    ap.add_argument("--editors", default="pix2pix-zero,diffedit,sdedit")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="torch.compile's kernel cache (default: <fresh P2PZ_HOME>/torch-compile)",
    )
    ap.add_argument(
        "--opt", action="append", default=[], help="an editor option for every edit, e.g. loops=compile"
    )
    ap.add_argument(
        "--models",
        default="auto",
        help="comma list of P2PZ_MODELS values to time, each in its own processes: auto (p2pz's lean model "
        "classes, the default), diffusers (diffusers' / transformers' classes)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--profile", type=Path, default=None, help="also one cProfiled run per editor, into this folder"
    )
    ap.add_argument(
        "--detail",
        action="store_true",
        help="also one run per editor that times each graph capture, VAE pass and text encoding (synchronized)",
    )
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    steps = args.steps or (3 if args.tiny else 50)
    results: dict[str, Any] = {
        "info": {
            "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "steps": steps,
            "models": "tiny" if args.tiny else "sd14 (random weights, float16 folder)",
            "date": time.strftime("%Y-%m-%d"),
        },
        "ours": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prep = prepare(work, args.tiny, device)
        results["info"]["prepare_s"] = prep["prepare_s"]
        extra_env = {"TORCHINDUCTOR_CACHE_DIR": args.cache_dir} if args.cache_dir else {}
        print(json.dumps(results["info"]), flush=True)
        for editor, models in [(e, m) for e in args.editors.split(",") for m in args.models.split(",")]:
            key = editor if models == "auto" else f"{editor} (P2PZ_MODELS={models})"
            env_m = dict(extra_env, P2PZ_MODELS=models)
            rows = []
            for i in range(args.runs):
                row = run_ours(
                    prep, editor, work / f"{editor}-{models}-{i}.png", steps, device, env_m, args.opt
                )
                rows.append(row)
                print(key, i, json.dumps(row), flush=True)
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                env = dict(env_m, P2PZ_BENCH_PROFILE=str(args.profile / f"{editor}-{models}.txt"))
                run_ours(prep, editor, work / f"{editor}-prof.png", steps, device, env, args.opt)
            ok = [r for r in rows if "error" not in r]
            results["ours"][key] = {
                "first_run_s": rows[0]["wall_s"],
                "median_later_s": statistics.median(r["wall_s"] for r in ok[1:]) if len(ok) > 1 else None,
                "runs": rows,
            }
            if args.detail:
                env = dict(env_m, P2PZ_BENCH_DETAIL="1")
                row = run_ours(prep, editor, work / f"{editor}-detail.png", steps, device, env, args.opt)
                results["ours"][key]["detail_run"] = row
                print(key, "detail", json.dumps(row), flush=True)
        if not args.skip_diffusers:
            ts, parts = [], None
            for i in range(max(1, args.runs - 1)):
                t0 = time.perf_counter()
                r = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child-diffusers", str(prep["model"]),
                     str(prep["photo"]), str(prep["embeds"]), str(work / f"diffusers-{i}.png"), str(steps), device],
                    capture_output=True, text=True,
                )  # fmt: skip
                ts.append(time.perf_counter() - t0)
                if r.returncode != 0:
                    results["diffusers"] = {"error": r.stderr[-2000:]}
                    break
                parts = json.loads(r.stdout.strip().splitlines()[-1])
            else:
                results["diffusers"] = {"median_s": statistics.median(ts), "all_s": ts, "phases_last": parts}
            print("diffusers", json.dumps(results.get("diffusers")), flush=True)
        results["cli_startup_s"] = time_cli(prep, 3)
        print("cli", json.dumps(results["cli_startup_s"]), flush=True)

    print("\n| what | first run s | median later s | where the time goes (last run) |")
    print("| --- | --- | --- | --- |")
    for editor, r in results["ours"].items():
        last = next((x for x in reversed(r["runs"]) if "phases" in x), None)
        where = ", ".join(f"{k} {v:.2f}" for k, v in (last or {}).get("phases", {}).items() if v >= 0.05)
        med = r["median_later_s"]
        print(
            f"| ours `p2pz edit --editor {editor}` | {r['first_run_s']:.2f} | {med if med is None else f'{med:.2f}'} | {where} |"
        )
    d = results.get("diffusers")
    if d and "median_s" in d:
        where = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in d["phases_last"].items())
        print(f"| diffusers pix2pix-zero script | - | {d['median_s']:.2f} | {where} |")
    for k, v in results["cli_startup_s"].items():
        print(f"| `{k}` | - | {v:.2f} | |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
