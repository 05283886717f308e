"""Any Stable Diffusion model by id: the text encoder is identified from the model's own small files
(``model_index.json``, ``text_encoder/config.json``, ``tokenizer/``) on a (fake) Hub, not from a table."""

from __future__ import annotations

import json
from pathlib import Path

import hub_server
import pytest

from p2pz_directions import directions, editors
from p2pz_directions.core.errors import EncoderMismatchError, FormatError
from p2pz_directions.editing.models import CLIP_L, KNOWN_MODELS, OPENCLIP_H, EncoderLoadError, encoder_for

pytestmark = pytest.mark.usefixtures("one_thread")
fake_hub = hub_server.fake_hub

COMMUNITY = "carol/tiny-community-sd"  # in no table: the tiny SD 1.x model, on the Hub
VARIANT = "carol/tiny-sd2-variant"  # the tiny SD 2.x model


def upload_folder(hub, repo_id: str, folder: Path) -> None:
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    hub.upload(repo_id, files, repo_type="model")


def resolves(hub) -> list[str]:
    return [r["path"] for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]


def config_repo(
    hub, repo_id: str, te_config: dict | None, *, index: dict | None = None, tokenizer: bool = True
):
    """A model repo of config files only (real-size architectures without their weights)."""
    files: dict[str, bytes] = {}
    if index is not False:
        files["model_index.json"] = json.dumps(
            index
            or {
                "_class_name": "StableDiffusionPipeline",
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
            }
        ).encode()
    if te_config is not None:
        files["text_encoder/config.json"] = json.dumps(te_config).encode()
    if tokenizer:
        files["tokenizer/tokenizer_config.json"] = b'{"model_max_length": 77}'
    files["unet/config.json"] = b"{}"
    hub.upload(repo_id, files, repo_type="model")


def clip_config(**kw) -> dict:
    cfg = {
        "_name_or_path": "/home/someone/checkpoints/text_encoder",
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "quick_gelu",
    }
    cfg.update(kw)
    return cfg


def test_a_model_in_no_table_resolves_from_its_config(fake_hub, tiny_sd1, tiny_sd2):
    upload_folder(fake_hub, COMMUNITY, tiny_sd1)
    upload_folder(fake_hub, VARIANT, tiny_sd2)
    assert COMMUNITY not in KNOWN_MODELS and VARIANT not in KNOWN_MODELS
    a = encoder_for(model=COMMUNITY)
    assert a == encoder_for(model=tiny_sd1)  # the same weights: the same identity as the local folder
    assert a.hidden_size == 32 and a.id.startswith("local/clip_text_model-d32-")
    b = encoder_for(model=VARIANT)
    assert b == encoder_for(model=tiny_sd2) and b.hidden_size == 64 and b.id != a.id
    fetched = resolves(fake_hub)
    assert any(p.endswith("text_encoder/config.json") for p in fetched)
    # only small files and the text encoder's own weights (the fake Hub has no LFS sha256 ETags)
    assert not any("/unet/" in p or "/vae/" in p for p in fetched), fetched


def test_build_load_and_edit_by_id(fake_hub, tiny_sd1, tiny_sd2, capsys):
    from p2pz_directions.cli import main

    upload_folder(fake_hub, COMMUNITY, tiny_sd1)
    upload_folder(fake_hub, VARIANT, tiny_sd2)
    args = ["build", "cat", "dog", "--model", COMMUNITY, "--captioner", "templates", "--n", "20"]
    code = main([*args, "--near-duplicates", "off"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = directions.load("cat->dog", model=COMMUNITY)
    assert d.source.encoder == encoder_for(model=COMMUNITY) == encoder_for(model=tiny_sd1)
    assert directions.load("cat->dog", model=tiny_sd1).delta.equal(d.delta)  # one identity, by id or folder
    with pytest.raises(EncoderMismatchError):
        directions.load("cat->dog", model=VARIANT)  # a D=32 concept never meets the D=64 model
    ed = editors.get("sdedit", model=COMMUNITY, device="cpu")
    assert ed.encoder_info == d.source.encoder
    assert ed.resolve_direction("cat->dog").delta.equal(d.delta)
    with pytest.raises(EncoderMismatchError):
        editors.get("sdedit", model=VARIANT, device="cpu").resolve_direction("cat->dog")


def test_known_architectures_by_config(fake_hub):
    config_repo(fake_hub, "dave/sd15-finetune", clip_config(_name_or_path="openai/clip-vit-large-patch14"))
    config_repo(
        fake_hub, "dave/anime-v3", clip_config()
    )  # a community path in _name_or_path: by architecture
    h = clip_config(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096)
    config_repo(fake_hub, "dave/sd21-768-finetune", {**h, "hidden_act": "gelu"})
    assert encoder_for(model="dave/sd15-finetune") == CLIP_L
    assert encoder_for(model="dave/anime-v3") == CLIP_L
    assert encoder_for(model="dave/sd21-768-finetune") == OPENCLIP_H
    # an OpenCLIP-H-sized model with CLIP-L's activation is neither: it gets a weights fingerprint
    config_repo(fake_hub, "dave/odd", {**h, "hidden_act": "quick_gelu"})
    odd = encoder_for(model="dave/odd")
    assert odd.id.startswith("local/clip_text_model-d1024-") and odd not in (CLIP_L, OPENCLIP_H)
    # no weights were downloaded to learn any of this
    assert not any(p.endswith((".safetensors", ".bin")) for p in resolves(fake_hub))


@pytest.mark.parametrize(
    "repo, kwargs, match",
    [
        (
            "e/unet-only",
            {"te_config": None, "index": {"unet": ["diffusers", "UNet2DConditionModel"]}},
            "no text enc",
        ),
        ("e/no-te-config", {"te_config": None, "index": False}, "no text_encoder/config.json"),
        (
            "e/sdxl",
            {"te_config": clip_config(), "index": {"text_encoder": ["t", "C"], "text_encoder_2": ["t", "C"]}},
            "two or more text encoders",
        ),
        ("e/bert", {"te_config": {"model_type": "bert", "hidden_size": 768}}, "'bert'.*not one p2pz can run"),
        ("e/no-tokenizer", {"te_config": clip_config(), "tokenizer": False}, "no tokenizer/"),
    ],
)
def test_models_that_cannot_work_get_a_clear_error(fake_hub, repo, kwargs, match):
    te = kwargs.pop("te_config")
    config_repo(fake_hub, repo, te, **kwargs)
    with pytest.raises(EncoderLoadError, match=match):
        encoder_for(model=repo)


def test_unknown_repo_and_offline(fake_hub, tiny_sd1, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(FormatError, match="no such model repo"):
        encoder_for(model="nobody/nothing")
    upload_folder(fake_hub, COMMUNITY, tiny_sd1)
    online = encoder_for(model=COMMUNITY)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.requests)
    assert encoder_for(model=COMMUNITY) == online  # from the Hugging Face cache
    assert len(fake_hub.requests) == n
    config_repo(fake_hub, "dave/never-fetched", clip_config())
    with pytest.raises(EncoderLoadError, match="HF_HUB_OFFLINE"):
        encoder_for(model="dave/never-fetched")
    assert len(fake_hub.requests) == n


def test_the_hubs_sha256_spares_the_weights_download(fake_hub, tiny_sd1, monkeypatch):
    """On the real Hub a weights file is LFS and its ETag is its sha256: the fingerprint is taken
    from it, with no download (the fake Hub sends git ETags, so the test gives the LFS one)."""
    import dataclasses
    import hashlib

    import huggingface_hub

    upload_folder(fake_hub, COMMUNITY, tiny_sd1)
    weights = tiny_sd1 / "text_encoder" / "model.safetensors"
    real = huggingface_hub.get_hf_file_metadata

    def lfs_metadata(url, *a, **k):
        meta = real(url, *a, **k)
        if url.endswith("text_encoder/model.safetensors"):
            return dataclasses.replace(meta, etag=hashlib.sha256(weights.read_bytes()).hexdigest())
        return meta

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lfs_metadata)
    assert encoder_for(model=COMMUNITY) == encoder_for(model=tiny_sd1)
    assert not any(p.endswith(".safetensors") for p in resolves(fake_hub))


def test_a_local_folder_follows_the_same_rule(tmp_path, tiny_sd1):
    import shutil

    sdxl = tmp_path / "sdxl-like"
    shutil.copytree(tiny_sd1, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(
        json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModel"]})
    )
    with pytest.raises(EncoderLoadError, match="two or more text encoders"):
        encoder_for(model=sdxl)
    big = tmp_path / "sd15-copy"
    (big / "text_encoder").mkdir(parents=True)
    (big / "text_encoder" / "config.json").write_text(json.dumps(clip_config()))
    assert encoder_for(model=big) == CLIP_L  # by architecture, as for a Hub id
    (big / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(EncoderLoadError, match="not one p2pz can run"):
        encoder_for(model=big)
