"""Graphs vs eager pix2pix-zero loops on a GPU, against eager vs eager (the run-to-run spread).

Tiny SD2 (v-prediction), float32, a real-image edit with the regularizer (2 x 2), for a few
(cross-attention guidance, eta, steps) settings. Prints and writes (under $OUT, else /tmp) the max
abs differences of the edited image, the reference reconstruction and the inverted latents between
two eager runs, graphs and eager, and two graphs runs. Result on an H200:
benchmarks/results/graphs_vs_eager_h200.json.

    python benchmarks/diag_graphs_vs_eager.py                 # default kernels
    DET=1 MATH=1 python benchmarks/diag_graphs_vs_eager.py    # deterministic kernels, math SDPA
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    det = os.environ.get("DET") == "1"
    if det:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # before cuBLAS starts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import numpy as np
    import torch
    from PIL import Image
    from tiny_sd import make_tiny_sd

    from p2pz_directions import editors
    from p2pz_directions.core.concept import Concept, Direction
    from p2pz_directions.editing.models import encoder_for

    if det:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    math_ctx = contextlib.nullcontext
    if os.environ.get("MATH") == "1":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        math_ctx = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    tmp = tempfile.mkdtemp()
    os.environ["P2PZ_HOME"] = tmp + "/home"
    folder = make_tiny_sd(tmp + "/sd2", "sd2")
    enc = encoder_for(model=str(folder))
    g = torch.Generator().manual_seed(0)
    d = Direction(*[Concept(n, torch.randn(77, enc.hidden_size, generator=g), enc) for n in ("cat", "dog")])
    img = Image.fromarray((np.random.RandomState(6).rand(32, 32, 3) * 255).astype(np.uint8))
    reg = dict(lambda_auto_corr=20.0, lambda_kl=20.0, num_reg_steps=2, num_auto_corr_rolls=2)
    ed = editors.get("pix2pix-zero", model=str(folder), device="cuda", dtype=torch.float32)
    res: dict = {"det": det, "sdpa": "math" if os.environ.get("MATH") == "1" else "default"}

    def img_diff(a, b):
        return float(np.abs(a - b).max())

    for xa, eta, steps in [(0.1, 0.3, 2), (0.1, 0.0, 2), (0.01, 0.3, 2), (0.01, 0.3, 10)]:
        kw = dict(
            prompt="a cat", num_inference_steps=steps, seed=0, output_type="np", attention="fused", eta=eta,
            cross_attention_guidance_amount=xa, **reg,
        )  # fmt: skip
        with math_ctx():
            e1, e2 = ed.edit(img, d, loops="eager", **kw), ed.edit(img, d, loops="eager", **kw)
            g1, g2 = ed.edit(img, d, loops="graphs", **kw), ed.edit(img, d, loops="graphs", **kw)
        row = dict(
            eager_eager_img=img_diff(e1.image, e2.image),
            graphs_eager_img=img_diff(g1.image, e1.image),
            graphs_graphs_img=img_diff(g1.image, g2.image),
            eager_eager_rec=img_diff(e1.reconstruction, e2.reconstruction),
            graphs_eager_rec=img_diff(g1.reconstruction, e1.reconstruction),
            eager_eager_inv=float((e1.inverted_latents - e2.inverted_latents).abs().max()),
            graphs_eager_inv=float((g1.inverted_latents - e1.inverted_latents).abs().max()),
            img_range=float(np.abs(e1.image - 0.5).max()),
        )
        res[f"xa{xa}_eta{eta}_steps{steps}"] = row
        print(f"xa={xa} eta={eta} steps={steps}", json.dumps(row), flush=True)
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / f"diag_graphs_det{int(det)}_math{os.environ.get('MATH', '0')}.json").write_text(
        json.dumps(res, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
