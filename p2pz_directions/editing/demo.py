"""``p2pz demo``: the whole flow, offline, on a fresh install - a plumbing check, not a picture.

1. build a tiny Stable-Diffusion-shaped model with random weights (`make_tiny_sd(path, "sd1-8x")`:
   an 8x VAE like SD's, so a 512x512 picture gives 64x64 latents), saved and loaded back like a
   real one;
2. build the concepts ``cat`` and ``dog`` for its text encoder from template captions
   (`p2pz_directions.builder.pipeline.build`, no caption model needed) into a registry inside the output
   folder;
3. load ``demo:cat->dog`` by name;
4. edit a drawn test picture with every installed editor, saving each result.

The model's weights are random, so the pictures are noise: the demo shows that every piece is
installed and wired together. For real edits, give a real model (``--model
CompVis/stable-diffusion-v1-4``) to ``p2pz edit``.

The tiny-model builders here are also what the test-suite uses (``tests/tiny_sd.py`` keeps the
same names): ``make_tiny_sd(path, config="sd1"|"sd2"|"sd1-8x", seed=0)``, ``make_components(config)``,
``make_tokenizer(path)``, ``make_text_encoder(hidden)``.

>>> from p2pz_directions.editing.demo import run_demo
>>> report = run_demo("p2pz-demo")                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DemoReport",
    "demo_image",
    "make_components",
    "make_text_encoder",
    "make_tiny_sd",
    "make_tokenizer",
    "run_demo",
]

PLUMBING_NOTE = (
    "These pictures are a plumbing check, not a result: they come from a tiny model with RANDOM weights, "
    "so they are noise by design. They only show that model loading, the direction registry, the plugins "
    "and the samplers work together. "
    "For real edits run e.g. `p2pz edit photo.png --direction 'cat->dog' --model CompVis/stable-diffusion-v1-4`."
)

_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-")


# ---------------------------------------------------------------------------------------------------
# tiny random-weight models
# ---------------------------------------------------------------------------------------------------
def make_tokenizer(path: str | os.PathLike, max_length: int = 77):
    """A CLIP tokenizer over single characters (no merges), saved to ``path``."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(_CHARS)}
    vocab.update({c + "</w>": len(_CHARS) + i for i, c in enumerate(_CHARS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    src = path / "_src"
    src.mkdir(exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    (src / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(str(path))
    return tok


def make_text_encoder(hidden_size: int = 32, seed: int = 0, vocab_size: int = 1000):
    """A 5-layer CLIP text model of width ``hidden_size`` with seeded random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(cfg).eval()


#: the tiny configs: ``sd1`` / ``sd2`` (the test fixtures; a 2x VAE, for 32-64 px inputs) and
#: ``sd1-8x`` (the demo's: shaped like SD, an 8x VAE, so a 512x512 photo gives 64x64 latents)
TINY_CONFIGS = ("sd1", "sd2", "sd1-8x")


def sd_scheduler(**overrides: Any) -> Any:
    """Stable Diffusion's own DDIM schedule (scaled-linear betas 0.00085..0.012, ``steps_offset=1``),
    as its ``scheduler/scheduler_config.json`` sets it; ``overrides`` change single settings."""
    from diffusers import DDIMScheduler

    settings = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DDIMScheduler(**{**settings, **overrides})


def _sd_shaped_components(seed: int) -> dict[str, Any]:
    """A tiny model shaped like SD 1.x: the VAE downsamples 8x (three steps), the UNet works on
    latents of any size a multiple of 2; channel counts are small enough for a CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # attention only at 1/4 of the latent size: 16x16 tokens for 512 px
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(  # three downsamplings (8x) like SD's, few channels, no attention
        block_out_channels=[4, 4, 8, 8],
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=512,
        mid_block_add_attention=False,
    )
    scheduler = sd_scheduler()
    return {"unet": unet, "vae": vae, "text_encoder": make_text_encoder(32, seed), "scheduler": scheduler}


def make_components(config: str = "sd1", seed: int = 0) -> dict[str, Any]:
    """UNet, VAE, text encoder and DDIM scheduler of a tiny SD model (``"sd1"``: epsilon, D=32;
    ``"sd2"``: v-prediction, linear projections, D=64; ``"sd1-8x"``: epsilon, D=32, an 8x VAE
    like SD's, so real photo sizes work)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if config not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny config {config!r}; use one of {', '.join(TINY_CONFIGS)}")
    if config == "sd1-8x":
        return _sd_shaped_components(seed)
    sd2 = config == "sd2"
    d = 64 if sd2 else 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=d,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )
    scheduler = sd_scheduler(prediction_type="v_prediction" if sd2 else "epsilon")
    return {"unet": unet, "vae": vae, "text_encoder": make_text_encoder(d, seed), "scheduler": scheduler}


def make_tiny_sd(path: str | os.PathLike, config: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny diffusers Stable Diffusion folder to ``path`` and return it."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    comps = make_components(config, seed)
    tokenizer = make_tokenizer(path / "tokenizer")
    pipe = StableDiffusionPipeline(
        **comps,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))
    return path


# ---------------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------------
def demo_image(size: int = 64):
    """A drawn test picture (a cat-ish face on a gradient): something to edit without a download."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (90 + 100 * x // size, 140 + 80 * y // size, 200)
    d = ImageDraw.Draw(img)
    s = size / 64
    d.ellipse([16 * s, 20 * s, 48 * s, 52 * s], fill=(230, 150, 60))
    d.polygon([(18 * s, 26 * s), (22 * s, 10 * s), (30 * s, 22 * s)], fill=(230, 150, 60))
    d.polygon([(46 * s, 26 * s), (42 * s, 10 * s), (34 * s, 22 * s)], fill=(230, 150, 60))
    d.ellipse([24 * s, 30 * s, 29 * s, 35 * s], fill=(20, 20, 20))
    d.ellipse([35 * s, 30 * s, 40 * s, 35 * s], fill=(20, 20, 20))
    return img


@dataclass
class DemoReport:
    out: Path
    model: Path
    direction: str
    outputs: dict[str, Path] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    note: str = PLUMBING_NOTE

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "model": str(self.model),
            "direction": self.direction,
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "failures": self.failures,
            "seconds": self.seconds,
            "note": self.note,
        }


#: the demo's tiny model: shaped like SD (8x VAE), so real photo sizes edit in seconds on a CPU
DEMO_CONFIG = "sd1-8x"


def _is_sd_shaped(model: Path) -> bool:
    """Whether ``model`` is a tiny model folder with an 8x VAE (what the demo builds today)."""
    try:
        cfg = json.loads((model / "vae" / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return (model / "model_index.json").is_file() and len(cfg.get("down_block_types", ())) == 4


@contextmanager
def _registry_at(root: Path):
    old = os.environ.get("P2PZ_HOME")
    os.environ["P2PZ_HOME"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("P2PZ_HOME", None)
        else:
            os.environ["P2PZ_HOME"] = old


def run_demo(
    out: str | os.PathLike = "p2pz-demo",
    *,
    steps: int = 4,
    n_captions: int = 24,
    editors_to_run: list[str] | None = None,
    image_size: int = 512,
    say: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoReport:
    """Run the offline demo into ``out``; returns what was written and what failed.

    The registry used is ``out/registry`` (your own registry is not touched). The model is the
    SD-shaped tiny one (``sd1-8x``: an 8x VAE), so the drawn ``image_size`` picture (512 by default,
    like a real photo) gives 64x64 latents, as Stable Diffusion's would.
    """
    from PIL import Image

    from p2pz_directions import directions, editors
    from p2pz_directions.builder.pipeline import build
    from p2pz_directions.editing.images import side_by_side

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-sd"
    if not _is_sd_shaped(model):
        say(f"building a tiny random-weight Stable Diffusion model (8x VAE, like SD's) in {model}")
        if model.exists():
            import shutil

            shutil.rmtree(model)  # an older demo's model (2x VAE): replaced
        make_tiny_sd(model, DEMO_CONFIG, seed=0)
    else:
        say(f"using the tiny model already in {model}")
    report = DemoReport(out=out, model=model, direction="demo:cat->dog")
    with _registry_at(out / "registry"):
        say("building concepts 'cat' and 'dog' for its text encoder from template captions (pack 'demo')")
        build(
            "cat",
            "dog",
            model=str(model),
            captioner="templates",
            n=n_captions,
            min_captions=4,
            pack="demo",
            device="cpu",
        )
        direction = directions.load(report.direction, model=str(model))
        say(f"loaded {direction.name} by name (encoder {direction.encoder.id})")
        image = demo_image(image_size)
        image.save(out / "input.png")
        names = editors_to_run or editors.available()
        strip: list[Image.Image] = [image]
        for name in names:
            say(f"editing with {name} ...")
            try:
                ed = editors.get(name, model=str(model), device="cpu", dtype=torch.float32)
                wanted = {"prompt": "a photo of a cat", "num_inference_steps": steps, "seed": 0}
                accepted = ed.option_names()
                opts = {k: v for k, v in wanted.items() if accepted is None or k in accepted}
                res = ed.edit(image, report.direction, progress=progress, **opts)
            except Exception as e:  # noqa: BLE001 - one editor failing must not hide the others
                report.failures[name] = f"{type(e).__name__}: {e}"
                say(f"  {name} failed: {type(e).__name__}: {e}")
                continue
            path = out / f"{name}.png"
            res.image.save(path)
            report.outputs[name] = path
            report.seconds[name] = float(res.extra.get("seconds", 0.0))
            strip.append(res.image)
            say(f"  wrote {path}")
        if len(strip) > 1:
            side_by_side(strip).save(out / "compare.png")
            report.outputs["compare"] = out / "compare.png"
    say(PLUMBING_NOTE)
    return report
