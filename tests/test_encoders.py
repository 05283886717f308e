"""Batched text encoding against the authors' one-caption-at-a-time loop; loading and identity."""

from __future__ import annotations

import json

import pytest
import torch

from p2pz_directions.builder.encoders import EncoderLoadError, TextEncoder, encode_one_by_one, load_tokenizer
from p2pz_directions.editing.models import encoder_for

pytestmark = pytest.mark.usefixtures("one_thread")


CAPTIONS = [
    "a cat",
    "a photo of a cat sitting on the street",
    "a painting of a cat in a field, oil on canvas",
    "cat " * 40,  # longer than 77 tokens: truncated the same way in both paths
    "two cats!",
    "a close-up photo of a cat's face",
    "a black and white photo of a small cat",
]


@pytest.fixture(scope="module")
def te1(tiny_sd1):
    return TextEncoder.from_pretrained(tiny_sd1, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("batch_size", [1, 3, 1024])
def test_batched_equals_authors_loop_fp32(te1, batch_size):
    ours = te1.encode(CAPTIONS, batch_size=batch_size)
    ref = encode_one_by_one(CAPTIONS, te1.tokenizer, te1.text_encoder, "cpu")
    assert ours.shape == (77, 32) and ours.dtype == torch.float32 and ref.shape == (1, 77, 32)
    torch.testing.assert_close(ours, ref[0], atol=1e-5, rtol=1e-5)
    assert not ours.requires_grad


def test_sd2_encoder_matches_too(tiny_sd2):
    te = TextEncoder.from_pretrained(tiny_sd2, device="cpu")
    ours = te.encode(CAPTIONS, batch_size=4)
    ref = encode_one_by_one(CAPTIONS, te.tokenizer, te.text_encoder, "cpu")
    torch.testing.assert_close(ours, ref[0], atol=1e-5, rtol=1e-5)
    assert ours.shape == (77, 64) and te.info.hidden_size == 64


def test_identity_is_the_one_core_uses(te1, tiny_sd1, tiny_sd2):
    assert te1.info == encoder_for(model=tiny_sd1)
    assert te1.info.id.startswith("local/") and te1.info.max_length == 77
    assert TextEncoder.from_pretrained(tiny_sd2).info != te1.info


def test_clip_folder_as_encoder(tmp_path, te1):
    folder = tmp_path / "clip-text"
    te1.text_encoder.save_pretrained(folder)
    te1.tokenizer.save_pretrained(folder)
    te = TextEncoder.from_pretrained(encoder=folder)
    assert te.info.id == te1.info.id  # same weights, same fingerprint
    torch.testing.assert_close(te.encode(CAPTIONS), te1.encode(CAPTIONS))


def test_progress_and_token_counts(te1):
    seen = []
    te1.encode(CAPTIONS, batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(3, 7), (6, 7), (7, 7)]
    counts = te1.count_tokens(["a cat", "cat " * 40])
    assert counts[0] == 6 and counts[1] > 77  # one token per letter + start/end tokens


def test_settings_record_how(te1):
    s = json.loads(json.dumps(te1.settings()))
    assert s["dtype"] == "float32" and s["device_type"] == "cpu" and s["padding"] == "max_length"
    assert s["source"].startswith("local:")


def test_model_without_text_encoder(tmp_path):
    bad = tmp_path / "unet-only"
    (bad / "unet").mkdir(parents=True)
    (bad / "model_index.json").write_text("{}", "utf-8")
    with pytest.raises(EncoderLoadError, match="has no text encoder"):
        TextEncoder.from_pretrained(bad)
    with pytest.raises(EncoderLoadError, match="has no text encoder"):
        load_tokenizer(bad)
    with pytest.raises(EncoderLoadError, match="neither"):
        TextEncoder.from_pretrained(tmp_path / "unet-only" / "unet")


def test_missing_tokenizer_and_unknown_id(tmp_path, tiny_sd1):
    import shutil

    copy = tmp_path / "no-tok"
    shutil.copytree(tiny_sd1 / "text_encoder", copy / "text_encoder")
    with pytest.raises(EncoderLoadError, match="no tokenizer"):
        TextEncoder.from_pretrained(copy)
    # identified from its small files before any load: offline and not cached, said at once
    with pytest.raises(
        EncoderLoadError, match="unknown model 'nobody/no-such-model-anywhere'.*HF_HUB_OFFLINE"
    ):
        TextEncoder.from_pretrained("nobody/no-such-model-anywhere")


def test_empty_and_bad_batch(te1):
    with pytest.raises(ValueError, match="no captions"):
        te1.encode([])
    with pytest.raises(ValueError, match="batch_size"):
        te1.encode(["a cat"], batch_size=0)
