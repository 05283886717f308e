"""Shared fixtures: no network, a fresh registry per test, tiny models built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
AUTHORS_EMB = SHARED_DATA / "pix2pix-zero" / "embeddings_sd_1.4"
AUTHORS_IMAGES = SHARED_DATA / "pix2pix-zero" / "test_images"


@pytest.fixture(autouse=True)
def p2pz_home(tmp_path, monkeypatch):
    """Every test gets its own empty registry."""
    home = tmp_path / "p2pz-home"
    monkeypatch.setenv("P2PZ_HOME", str(home))
    return home


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core runner they lose a lot.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def authors_embeddings() -> Path:
    if not (AUTHORS_EMB / "cat.pt").is_file():
        pytest.skip(f"reference data absent: {AUTHORS_EMB} (CI always has ../shared/data)")
    return AUTHORS_EMB


@pytest.fixture
def authors_images() -> Path:
    if not (AUTHORS_IMAGES / "cat_6.png").is_file():
        pytest.skip(f"reference data absent: {AUTHORS_IMAGES} (CI always has ../shared/data)")
    return AUTHORS_IMAGES


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """A tiny SD-1.x-like model folder (epsilon prediction, D=32)."""
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd1"), "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """A tiny SD-2.x-like model folder (v-prediction, linear projections, D=64)."""
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd2"), "sd2")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The offline CLIP tokenizer of diffusers' dummy components (tests/diffusers_dummies.py)."""
    from tiny_sd import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))
