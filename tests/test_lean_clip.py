"""`p2pz_directions.lean.clip`: the lean CLIP text model and tokenizer give what transformers'
``CLIPTextModel`` / ``CLIPTokenizer`` give for the same folder, and refuse (`LeanUnsupported`) what
they do not handle. Offline; tiny models only."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2pz_directions.lean import LeanUnsupported
from p2pz_directions.lean import clip as lean_clip
from p2pz_directions.lean.clip import LeanCLIPTextModel, LeanCLIPTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
PROMPTS = [
    "a photo of a cat",
    "a dog sitting on the grass, photo",
    "",
    "cat " * 60,  # longer than 77 tokens: truncated
    "it's a cat",
]


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert torch.equal(a, b), f"{what}: not bit-equal to transformers (max |diff| {diff:.3g})"


def _ids(tok_folder: Path, prompts: list[str] = PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tok_folder))
    enc = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert (enc.attention_mask == 0).any(), "the test batch must contain padding"
    return enc.input_ids, enc.attention_mask


@torch.no_grad()
def _assert_model_equal(ref, lean: LeanCLIPTextModel, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
    a = ref(ids, attention_mask=mask, output_hidden_states=True)
    b = lean(ids, attention_mask=mask, output_hidden_states=True)
    tag = "with mask" if mask is not None else "no mask"
    _same(a.last_hidden_state, b.last_hidden_state, f"last_hidden_state ({tag})")
    _same(a.pooler_output, b.pooler_output, f"pooler_output ({tag})")
    _same(a[0], b[0], f"out[0] ({tag})")
    assert len(a.hidden_states) == len(b.hidden_states) == lean.config.num_hidden_layers + 1
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        _same(x, y, f"hidden_states[{i}] ({tag})")
    # what sampling/text.py computes for clip_skip: the final layer norm of an earlier layer
    for k in (1, 2):
        _same(
            ref.final_layer_norm(a[-1][-(k + 1)]),
            lean.text_model.final_layer_norm(b[-1][-(k + 1)]),
            f"clip_skip={k} ({tag})",
        )
    # without hidden states: (last_hidden_state, pooler_output) only
    c = lean(ids, attention_mask=mask)
    assert len(c) == 2 and c.hidden_states is None
    _same(a[0], c[0], f"plain call ({tag})")
    t = lean(ids, attention_mask=mask, output_hidden_states=True, return_dict=False)
    assert type(t) is tuple and len(t) == 3
    _same(a[1], t[1], f"return_dict=False ({tag})")


def _small_clip_config(**kw):
    from transformers import CLIPTextConfig

    settings = dict(
        hidden_size=48,
        intermediate_size=40,
        num_attention_heads=6,
        num_hidden_layers=3,
        vocab_size=120,
        max_position_embeddings=77,
        bos_token_id=98,
        eos_token_id=99,  # not the largest id: pooling must take the first eos, not the argmax
        pad_token_id=1,
    )
    settings.update(kw)
    return CLIPTextConfig(**settings)


def _save_text_model(path: Path, seed: int = 0, **kw) -> Path:
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    CLIPTextModel(_small_clip_config(**kw)).eval().save_pretrained(str(path))
    return path


def _eos_ids(batch: int = 4, length: int = 77, vocab: int = 120, bos: int = 98, eos: int = 99):
    """bos, random tokens (some above eos), eos, then eos as padding (SD 1.x style); the mask is 0
    after the first eos."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab - 2, (batch, length), generator=g)
    ids[ids >= min(bos, eos)] += 2  # never bos or eos in the text
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate([5, 20, 1, 60][:batch]):
        ids[i, 0] = bos
        ids[i, n + 1 :] = eos
        mask[i, : n + 2] = 1
    assert (ids.argmax(-1) != (ids == eos).int().argmax(-1)).any()
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# the text model
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sd2"])
def test_text_model_matches_transformers(model, request):
    from transformers import CLIPTextModel

    folder = request.getfixturevalue(model)
    ref = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    lean = LeanCLIPTextModel.from_folder(folder / "text_encoder")
    assert lean.config.hidden_size == ref.config.hidden_size and lean.eos_token_id == 2
    # transformers 4's names (transformers 5 dropped the "text_model." prefix of CLIPTextModel)
    assert set(lean.state_dict()) == {f"text_model.{k}" for k in ref.state_dict()}
    ids, mask = _ids(folder / "tokenizer")
    _assert_model_equal(ref, lean, ids, None)
    _assert_model_equal(ref, lean, ids, mask)
    _assert_model_equal(ref, lean, ids, torch.ones_like(mask))  # all-ones: sdpa's own causal mask
    with torch.no_grad():  # the padding mask really is applied (it changes the padded positions)
        assert not torch.equal(lean(ids, attention_mask=mask)[0], lean(ids)[0])
    assert lean.training is False and not any(p.requires_grad for p in lean.parameters())
    assert lean.dtype == torch.float32 and lean.device == torch.device("cpu")
    assert getattr(lean.config, "use_attention_mask", False) is False
    assert lean.config_dict["hidden_act"] == "quick_gelu"


def test_text_model_gelu_and_eos_pooling(tmp_path):
    """hidden_act "gelu" (exact erf gelu) and a config whose eos_token_id is not 2 (pooling at the
    first eos, not at the largest id)."""
    from transformers import CLIPTextModel

    folder = _save_text_model(tmp_path / "te", hidden_act="gelu")
    ref = CLIPTextModel.from_pretrained(str(folder)).eval()
    lean = LeanCLIPTextModel.from_folder(folder)
    assert lean.config.hidden_act == "gelu" and lean.eos_token_id == 99
    ids, mask = _eos_ids()
    _assert_model_equal(ref, lean, ids, None)
    _assert_model_equal(ref, lean, ids, mask)
    with torch.no_grad():
        out = lean(ids)
    first_eos = (ids == 99).int().argmax(-1)
    _same(out.pooler_output, out.last_hidden_state[torch.arange(4), first_eos], "pooled at the first eos")


def test_text_model_of_a_clip_model_folder(tmp_path):
    """A whole CLIPModel folder (model_type "clip" with text_config): its text tower."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=_small_clip_config().to_dict(),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=20,
            num_attention_heads=2,
            num_hidden_layers=1,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    ref = CLIPModel(cfg).eval()
    ref.save_pretrained(str(tmp_path / "clip"))
    lean = LeanCLIPTextModel.from_folder(tmp_path / "clip")
    ids, mask = _eos_ids()
    _assert_model_equal(ref.text_model, lean, ids, mask)


def test_text_model_old_key_layout(tmp_path, tiny_sd1):
    """transformers 4 files: "text_model."-prefixed keys and a stored position_ids buffer."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    src = tiny_sd1 / "text_encoder"
    dst = tmp_path / "te"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    sd = load_file(str(src / "model.safetensors"))
    old = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77).expand(1, -1).contiguous()
    save_file(old, str(dst / "model.safetensors"))
    ref = CLIPTextModel.from_pretrained(str(src)).eval()
    lean = LeanCLIPTextModel.from_folder(dst)
    ids, mask = _ids(tiny_sd1 / "tokenizer")
    _assert_model_equal(ref, lean, ids, mask)
    assert set(lean.state_dict()) == set(old) - {"text_model.embeddings.position_ids"}


def test_text_model_bfloat16(tiny_sd1):
    from transformers import CLIPTextModel

    lean = LeanCLIPTextModel.from_folder(tiny_sd1 / "text_encoder", dtype=torch.bfloat16)
    assert lean.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lean.parameters())
    assert lean.text_model.embeddings.position_ids.dtype == torch.long
    ids, mask = _ids(tiny_sd1 / "tokenizer")
    ref = CLIPTextModel.from_pretrained(str(tiny_sd1 / "text_encoder")).eval()
    with torch.no_grad():
        out = lean(ids, attention_mask=mask)[0]
        want = ref(ids, attention_mask=mask)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)


def test_text_model_sharded(tmp_path):
    from transformers import CLIPTextModel

    folder = tmp_path / "te"
    torch.manual_seed(0)
    ref = CLIPTextModel(_small_clip_config()).eval()
    ref.save_pretrained(str(folder), max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    lean = LeanCLIPTextModel.from_folder(folder)
    ids, mask = _eos_ids()
    _assert_model_equal(ref, lean, ids, mask)

    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    for bad in ("../" + shards[0].name, "/etc/passwd", "missing-00001.safetensors"):
        data["weight_map"][key] = bad
        index.write_text(json.dumps(data))
        with pytest.raises(LeanUnsupported, match="shard"):
            LeanCLIPTextModel.from_folder(folder)


def test_text_model_variant(tmp_path):
    from transformers import CLIPTextModel

    folder = tmp_path / "te"
    torch.manual_seed(0)
    ref = CLIPTextModel(_small_clip_config()).eval()
    ref.save_pretrained(str(folder), variant="fp16")
    assert (folder / "model.fp16.safetensors").is_file()
    lean = LeanCLIPTextModel.from_folder(folder, variant="fp16")
    ids, mask = _eos_ids()
    _assert_model_equal(ref, lean, ids, mask)
    with pytest.raises(LeanUnsupported, match="safetensors"):
        LeanCLIPTextModel.from_folder(folder)  # no model.safetensors without the variant


def test_text_model_missing_weights(tmp_path, tiny_sd1):
    folder = tmp_path / "te"
    folder.mkdir()
    shutil.copy(tiny_sd1 / "text_encoder" / "config.json", folder / "config.json")
    with pytest.raises(LeanUnsupported, match="no weights"):
        LeanCLIPTextModel.from_folder(folder)
    with pytest.raises(LeanUnsupported, match="config"):
        LeanCLIPTextModel.from_folder(tmp_path)  # no config.json


def test_text_model_bin_only(tmp_path, tiny_sd1):
    from safetensors.torch import load_file

    folder = tmp_path / "te"
    folder.mkdir()
    shutil.copy(tiny_sd1 / "text_encoder" / "config.json", folder / "config.json")
    torch.save(load_file(str(tiny_sd1 / "text_encoder" / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(LeanUnsupported, match=r"pytorch_model\.bin.*safetensors only"):
        LeanCLIPTextModel.from_folder(folder)


def test_text_model_weights_that_do_not_fit(tmp_path, tiny_sd1):
    from safetensors.torch import load_file, save_file

    src = tiny_sd1 / "text_encoder"
    sd = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())

    def folder(name: str, state: dict, config: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        save_file(state, str(d / "model.safetensors"))
        return d

    part = {k: v for k, v in sd.items() if "layers.4." not in k}
    with pytest.raises(LeanUnsupported, match=r"missing for text_model\.encoder\.layers\.4\."):
        LeanCLIPTextModel.from_folder(folder("missing", part, cfg))
    with pytest.raises(LeanUnsupported, match="no place for"):
        LeanCLIPTextModel.from_folder(
            folder("extra", {**sd, "text_projection.weight": torch.zeros(4, 4)}, cfg)
        )
    with pytest.raises(LeanUnsupported, match="shape"):
        LeanCLIPTextModel.from_folder(folder("shape", sd, {**cfg, "vocab_size": 999}))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new'"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"architectures": ["CLIPTextModelWithProjection"]}, "CLIPTextModelWithProjection"),
        ({"model_type": "t5"}, "model_type 't5'"),
        ({"eos_token_id": [2, 3]}, "eos_token_id"),
        ({"num_attention_heads": 5}, "multiple"),
    ],
)
def test_text_model_unsupported_configs(tmp_path, tiny_sd1, change, match):
    folder = tmp_path / "te"
    shutil.copytree(tiny_sd1 / "text_encoder", folder)
    cfg = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LeanUnsupported, match=match):
        LeanCLIPTextModel.from_folder(folder)
    with pytest.raises(LeanUnsupported, match=match):
        LeanCLIPTextModel(cfg)


def test_text_model_config_size_bound(tmp_path, tiny_sd1, monkeypatch):
    monkeypatch.setattr(lean_clip, "CONFIG_MAX_BYTES", 100)
    with pytest.raises(LeanUnsupported, match="more than the 100"):
        LeanCLIPTextModel.from_folder(tiny_sd1 / "text_encoder")
    (tmp_path / "config.json").write_text("{not json")
    monkeypatch.setattr(lean_clip, "CONFIG_MAX_BYTES", 1 << 20)
    with pytest.raises(LeanUnsupported, match="cannot parse"):
        LeanCLIPTextModel.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) byte -> printable character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


CORPUS = """
a photo of a cat sitting on the grass . a photo of a dog sitting on the grass .
a painting of a cat , a painting of a dog , a drawing of the cat and the dog .
photography photographer photographed photos cats dogs kitten puppy grassland meadow
sitting sits sat standing stands running runs jumping jumps sleeping sleeps playing
it's we'll they're i'm you've she'd don't can't won't 1 2 3 4 5 6 7 8 9 0 !!! ??? ...
beautiful portrait landscape mountain river forest ocean sunset sunrise colorful
close up high quality detailed realistic cinematic lighting studio background white black
red green blue yellow orange purple brown gray golden silver wooden stone glass metal
café résumé naïve über straße
an astronaut riding a horse on the moon , oil painting by a famous artist , trending on artstation
watercolor sketch illustration anime cartoon digital art octane render unreal engine bokeh
windows doors houses gardens flowers trees leaves branches clouds rain snow winter summer
"""


def _learn_bpe(n_merges: int = 400) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary: the 256 byte characters, their ``</w>`` forms, merges learned on
    CORPUS (most frequent pair first), then ``<|startoftext|>`` and ``<|endoftext|>``."""
    b2u = _bytes_to_unicode()
    base = list(b2u.values())
    vocab = base + [c + "</w>" for c in base]
    words = collections.Counter(CORPUS.split())
    seqs = {}
    for w in words:
        chars = [b2u[b] for b in w.encode("utf-8")]
        seqs[w] = (*chars[:-1], chars[-1] + "</w>")
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, s in seqs.items():
            for a, b in zip(s, s[1:], strict=False):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        vocab.append(a + b)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def _old_token(content: str, typed: bool) -> dict:
    d = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **d} if typed else d


@pytest.fixture(scope="module")
def bpe_folders(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders over a realistic byte-level BPE vocabulary, in the layouts that occur:
    saved by transformers 5 (tokenizer.json), and hub-style SD 1.x / 2.x folders (vocab.json +
    merges.txt + tokenizer_config.json [+ special_tokens_map.json], no tokenizer.json)."""
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("bpe")
    vocab, merges = _learn_bpe()
    assert len(merges) >= 300, len(merges)
    src = root / "src"
    src.mkdir()
    (src / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    out: dict[str, Path] = {}

    out["saved"] = root / "saved"
    CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=77).save_pretrained(
        str(out["saved"])
    )
    out["saved_pad_bang"] = root / "saved_pad_bang"
    CLIPTokenizer(
        str(src / "vocab.json"), str(src / "merges.txt"), pad_token="!", model_max_length=77
    ).save_pretrained(str(out["saved_pad_bang"]))

    # like CompVis/stable-diffusion-v1-4's tokenizer folder
    hub1 = out["hub_sd1"] = root / "hub_sd1"
    hub1.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(src / f, hub1 / f)
    cfg = {
        "add_prefix_space": False,
        "bos_token": _old_token("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": _old_token("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _old_token("<|endoftext|>", True),
    }
    (hub1 / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    stm = {
        "bos_token": _old_token("<|startoftext|>", False),
        "eos_token": _old_token("<|endoftext|>", False),
        "pad_token": "<|endoftext|>",
        "unk_token": _old_token("<|endoftext|>", False),
    }
    (hub1 / "special_tokens_map.json").write_text(json.dumps(stm, indent=2))

    # like stabilityai/stable-diffusion-2-1's (pad "!"), written by a later transformers 4
    # (added_tokens_decoder), plus a textual-inversion token
    hub2 = out["hub_sd2"] = root / "hub_sd2"
    hub2.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(src / f, hub2 / f)
    n = len(vocab)
    cfg2 = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab["!"]): {**_old_token("!", False), "special": True},
            str(n - 2): {**_old_token("<|startoftext|>", False), "special": True},
            str(n - 1): {**_old_token("<|endoftext|>", False), "normalized": False, "special": True},
            str(n): {**_old_token("<cat-toy>", False), "special": False},
        },
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    (hub2 / "tokenizer_config.json").write_text(json.dumps(cfg2, indent=2))

    # vocab.json + merges.txt alone: CLIPTokenizer's default special tokens, no length limit
    bare = out["bare"] = root / "bare"
    bare.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(src / f, bare / f)
    return out


STRINGS = [
    "",
    "a photo of a cat",
    "A Photo OF a CaT sitting ON the GRASS",
    "  a   photo\n\nof \t a\r\n cat  ",
    "\t\n ",
    "photo, cat! dog? (grass) [x] {y} #1 $2.50 100% a.b-c_d/e\\f",
    "1234567890 3.14 42nd 1st",
    "it's we'll they're i'm you've she'd don't IT'S WE'LL",
    "café résumé naïve über straße Café",
    "猫 の写真, 一只猫",
    "🐱🐶 👍🏽 a cat 🐈‍⬛",
    "ﬁne Ａ ｂ ① e\u0301",  # compatibility forms and a combining accent (NFC, not NFKC)
    "<|startoftext|>a cat<|endoftext|>",
    "a <|endoftext|> b <|ENDOFTEXT|> c <|startoftext|>",
    "<cat-toy> on the grass",
    "photography photographer photographed",
    "cat " * 100,
    " ".join(["a photo of a cat sitting on the grass"] * 12),
]


def _backend_state(tok) -> dict:
    state = json.loads(tok.to_str())
    state["truncation"] = state["padding"] = None  # per-call settings
    return state


def _assert_tokenizer_equal(folder: Path) -> tuple:
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(str(folder))
    lean = LeanCLIPTokenizer.from_folder(folder)
    # the whole Rust pipeline: normalizer, pre-tokenizer, BPE model (vocab, merges, settings),
    # added tokens with their flags, post-processor, decoder
    a, b = _backend_state(ref.backend_tokenizer), _backend_state(lean.backend_tokenizer)
    for key in a:
        assert a[key] == b[key], f"{folder.name}: backend {key} differs"
    assert a == b
    for attr in (
        "model_max_length",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",
        "vocab_size",
    ):
        assert getattr(ref, attr) == getattr(lean, attr), attr
    assert (ref.bos_token, ref.eos_token, ref.pad_token) == (lean.bos_token, lean.eos_token, lean.pad_token)
    assert len(ref) == len(lean)

    calls = [
        {},
        {"padding": "max_length", "max_length": 77, "truncation": True, "return_tensors": "pt"},
        {"padding": "max_length", "truncation": True, "return_tensors": "pt"},  # max_length from the model
        {"padding": "max_length", "max_length": 77, "truncation": True},
        {"truncation": True, "max_length": 10},  # plugins/ledits.py
        {"max_length": 12},  # max_length alone truncates (transformers' rule)
        {"truncation": False},
        {"padding": True},
        {"padding": "longest", "truncation": True, "return_tensors": "pt"},
        {"padding": "max_length", "max_length": 80},  # no truncation: long rows stay long
        {"padding": False, "truncation": True},
    ]
    inputs = [STRINGS, STRINGS[1:2], *STRINGS]
    for kw in calls:
        for text in inputs:
            try:
                x = ref(text, **kw)
            except ValueError:  # e.g. unequal rows as tensors: the lean tokenizer refuses them too
                with pytest.raises(ValueError):
                    lean(text, **kw)
                continue
            y = lean(text, **kw)
            assert set(x.keys()) == set(y.keys()) == {"input_ids", "attention_mask"}
            for key in ("input_ids", "attention_mask"):
                u, v = x[key], y[key]
                if isinstance(u, torch.Tensor):
                    assert isinstance(v, torch.Tensor) and v.dtype == torch.long, (kw, key)
                    assert torch.equal(u, v), (folder.name, kw, text, key)
                else:
                    assert u == v, (folder.name, kw, text, key)
            assert y.input_ids is y["input_ids"]
    for text in STRINGS:
        ids = ref(text).input_ids
        for skip in (False, True):
            assert ref.decode(ids, skip_special_tokens=skip) == lean.decode(ids, skip_special_tokens=skip), (
                text
            )
    return ref, lean


def test_tokenizer_matches_transformers_tiny(tiny_sd1):
    ref, lean = _assert_tokenizer_equal(tiny_sd1 / "tokenizer")
    ids = lean("a cat").input_ids
    assert ids[0] == lean.bos_token_id and ids[-1] == lean.eos_token_id


@pytest.mark.parametrize("layout", ["saved", "saved_pad_bang", "hub_sd1", "hub_sd2", "bare"])
def test_tokenizer_matches_transformers_bpe(bpe_folders, layout):
    folder = bpe_folders[layout]
    assert (folder / "tokenizer.json").is_file() == layout.startswith("saved")
    ref, lean = _assert_tokenizer_equal(folder)
    # the vocabulary really merges: whole words, not single bytes
    ids = lean("a photo of a cat").input_ids
    assert len(ids) == 7 and min(ids[2], ids[3], ids[5]) >= 512, ids  # photo, of, cat: merged tokens
    expect_pad = "!" if layout in ("saved_pad_bang", "hub_sd2") else "<|endoftext|>"
    assert lean.pad_token == expect_pad
    assert lean.pad_token_id == lean.convert_tokens_to_ids(expect_pad)
    enc = lean(
        ["a cat", "cat " * 100], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    assert enc.input_ids.shape == (2, 77) and enc.attention_mask.dtype == torch.long
    assert enc.input_ids[1, 0] == lean.bos_token_id and enc.input_ids[1, -1] == lean.eos_token_id
    assert enc.attention_mask[0].sum() == 4 and (enc.input_ids[0, 4:] == lean.pad_token_id).all()
    assert enc.attention_mask[1].sum() == 77


def test_tokenizer_unsupported(tmp_path, bpe_folders, monkeypatch):
    folder = tmp_path / "tok"
    shutil.copytree(bpe_folders["hub_sd1"], folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(LeanUnsupported, match="T5Tokenizer"):
        LeanCLIPTokenizer.from_folder(folder)
    cfg_path.write_text(json.dumps(cfg))
    LeanCLIPTokenizer.from_folder(folder)  # fine again
    monkeypatch.setattr(lean_clip, "TOKENIZER_FILE_MAX_BYTES", 1000)
    with pytest.raises(LeanUnsupported, match=r"vocab\.json .* more than the 1000"):
        LeanCLIPTokenizer.from_folder(folder)
    with pytest.raises(LeanUnsupported, match=r"tokenizer\.json .* more than the 1000"):
        LeanCLIPTokenizer.from_folder(bpe_folders["saved"])
    monkeypatch.undo()
    os.remove(folder / "merges.txt")
    with pytest.raises(LeanUnsupported, match=r"merges\.txt"):
        LeanCLIPTokenizer.from_folder(folder)
    with pytest.raises(LeanUnsupported, match="not a folder"):
        LeanCLIPTokenizer.from_folder(tmp_path / "nowhere")


def test_tokenizer_call_errors(tiny_sd1):
    tok = LeanCLIPTokenizer.from_folder(tiny_sd1 / "tokenizer")
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a", "a b c"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="sideways")
    assert tok("a cat", return_tensors="pt").input_ids.shape == (1, 6)


# ---------------------------------------------------------------------------------------------------
# no transformers, no diffusers
# ---------------------------------------------------------------------------------------------------
def test_lean_clip_imports_neither_transformers_nor_diffusers(tiny_sd1):
    script = """
import json, sys
import p2pz_directions.lean.clip as c
folder = sys.argv[1]
te = c.LeanCLIPTextModel.from_folder(folder + "/text_encoder")
tok = c.LeanCLIPTokenizer.from_folder(folder + "/tokenizer")
enc = tok(["a cat", "a dog"], padding="max_length", max_length=tok.model_max_length, truncation=True,
          return_tensors="pt")
out = te(enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
te.text_model.final_layer_norm(out[-1][-2])
print(json.dumps({"transformers": "transformers" in sys.modules, "diffusers": "diffusers" in sys.modules,
                  "shape": list(out[0].shape)}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", script, str(tiny_sd1)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"transformers": False, "diffusers": False, "shape": [2, 77, 32]}, got
