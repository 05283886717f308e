"""Tiny random-weight Stable Diffusion models for the tests, built offline and saved like a real
model folder (diffusers' ``get_dummy_components()`` style).

The builders live in the package (`p2pz_directions.editing.demo`), since ``p2pz demo`` needs them on a
fresh install too; the tests import them from here.

Configs:
- ``sd1``: epsilon prediction, text hidden size 32 (stands in for CLIP ViT-L/14)
- ``sd2``: v-prediction, linear projections, attention head dims (2, 4), text hidden size 64
  (stands in for OpenCLIP ViT-H/14)
"""

from p2pz_directions.editing.demo import make_components, make_text_encoder, make_tiny_sd, make_tokenizer

__all__ = ["make_components", "make_text_encoder", "make_tiny_sd", "make_tokenizer"]
