"""Hostile packs served by the fake Hub, and the store's namespace: each case of issues 15 and 18.

Every test builds an honest pack, pushes it with the real client, then lets the fake Hub serve a
hostile variant (`hub_server.FakeHub.replace_in_pack`, `upload_index`, `dribble`) and checks the
documented error or the documented safe behaviour, with nothing installed or changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings

import hub_server
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from p2pz_directions import cli, directions, hub
from p2pz_directions.core import naming
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import (
    AmbiguousNameError,
    ImmutableVersionError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
)
from p2pz_directions.core.store import LocalStore, PackClashError
from p2pz_directions.packs import pack_schema

ENC = EncoderInfo("local/clip-test0123456789ab", 8, "clip", max_length=4)
REPO = "alice/pack"
fake_hub = hub_server.fake_hub  # the fixture


def concept(name: str, seed: int, captions=None) -> Concept:
    g = torch.Generator().manual_seed(seed)
    return Concept(
        name,
        torch.randn(ENC.max_length, ENC.hidden_size, generator=g),
        ENC,
        captions=captions or [f"a {name}"],
    )


@pytest.fixture
def stores(tmp_path):
    mine = LocalStore(tmp_path / "publisher")
    mine.publish_many([concept("cat", 1), concept("dog", 2)], pack="mine")
    return mine, LocalStore(tmp_path / "consumer")


def pull(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hub.UnknownEncoderWarning)
        return hub.pull(*args, **kwargs)


def tree(store: LocalStore, pack: str) -> dict[str, bytes]:
    root = store.pack_dir(pack)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rows_of(fake_hub, repo=REPO) -> list[dict]:
    return pq.read_table(io.BytesIO(fake_hub.file(repo, "index.parquet"))).to_pylist()


def meta_path(fake_hub, name: str, repo=REPO) -> str:
    return next(r["metadata_path"] for r in rows_of(fake_hub, repo) if r["name"] == name)


def other_content_rows(rows: list[dict], tmp_path, name: str, seed: int) -> tuple[dict, dict[str, bytes]]:
    """An index row and files for ``name@1`` with other content (as a rewritten history would have)."""
    rogue = LocalStore(tmp_path / f"rogue-{seed}")
    rogue.publish(concept(name, seed), pack="x")
    (e,) = rogue.entries(pack="x")
    meta, tensor = (e.path / "concept.json").read_bytes(), (e.path / "embedding.safetensors").read_bytes()
    d = pack_schema.concept_dir(ENC.id, name, 1)
    row = next(r for r in rows if r["name"] == name) | {
        "content_hash": json.loads(meta)["content_hash"],
        "sha256": hashlib.sha256(tensor).hexdigest(),
        "size": len(tensor),
        "metadata_sha256": hashlib.sha256(meta).hexdigest(),
        "metadata_size": len(meta),
    }
    return row, {f"{d}/concept.json": meta, f"{d}/embedding.safetensors": tensor}


# -- one namespace --------------------------------------------------------------------------------------
def test_local_names_cannot_take_a_hub_packs_folder():
    for bad in ("alice--pack", "a--b"):
        with pytest.raises(InvalidNameError, match="'--'"):
            naming.parse_pack(bad)
        with pytest.raises(InvalidNameError):
            LocalStore().publish(concept("cat", 0), pack=bad)
    with pytest.raises(InvalidNameError, match="'--'"):
        naming.parse_pack("alice/x--y")
    # one folder per pack, and no two valid names share one (Hub ids fold case)
    assert naming.pack_folder("alice/pack") == "alice--pack" == naming.pack_folder("Alice/Pack")
    assert naming.pack_folder("alice-pack") != naming.pack_folder("alice/pack")


def test_pull_never_replaces_a_local_pack_in_its_folder(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    # an older store's local pack that sits in the Hub pack's folder
    other.publish(concept("cat", 77), pack="legacy")
    (other.packs_root / "legacy").rename(other.packs_root / "alice--pack")
    before = tree(other, REPO)
    with pytest.raises(PackClashError, match="did not come from the Hub repo alice/pack"):
        pull(REPO, store=other)
    with pytest.raises(PackClashError):  # nor is it served for the Hub's name
        directions.load(f"{REPO}:cat->dog", store=other)
    assert tree(other, REPO) == before
    res = pull(REPO, store=other, force=True)
    assert res.added == ["dog@1"] and other.pack_info(REPO).source["repo_id"] == REPO
    assert other.entries(pack=REPO, name="cat")[0].content_hash == mine.entries(name="cat")[0].content_hash


# -- names bounded in bytes ------------------------------------------------------------------------------
def test_names_over_the_byte_bound_are_refused_at_parse_time_and_in_the_index(fake_hub, stores):
    long_cjk = "猫" * 100  # 100 characters, 300 bytes in UTF-8: over the file-name limit
    with pytest.raises(InvalidNameError, match="bytes long in UTF-8"):
        naming.normalize_concept(long_cjk)
    with pytest.raises(InvalidNameError):
        LocalStore().publish(concept(long_cjk, 0))
    assert naming.normalize_concept("猫" * 66) == "猫" * 66  # 198 bytes: fine
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    rows = rows_of(fake_hub)
    rows[0] |= {
        "name": long_cjk,
        "tensor_path": f"{pack_schema.concept_dir(ENC.id, long_cjk, 1)}/embedding.safetensors",
        "metadata_path": f"{pack_schema.concept_dir(ENC.id, long_cjk, 1)}/concept.json",
    }
    fake_hub.upload_index(REPO, rows)
    n = fake_hub.count("GET", "*/concepts/*")
    with pytest.raises(pack_schema.PackFormatError, match="bytes long in UTF-8"):
        pull(REPO, store=other)
    assert fake_hub.count("GET", "*/concepts/*") == n  # refused from the index alone
    assert not other.pack_dir(REPO).exists()


def test_case_folded_names_are_one_name():
    assert naming.normalize_concept("STRASSE") == naming.normalize_concept("straße") == "strasse"
    s = LocalStore()
    s.publish(concept("Straße", 1))
    assert [e.name for e in s.entries()] == ["strasse"]


# -- hostile text reaches no terminal ----------------------------------------------------------------
EVIL_CAPTIONS = [
    "\x1b]0;pwned\x07title",
    "\x1b[2J\x1b[Hcleared",
    "[bold red]loud[/]",
    "[/nonsense]",
    "a\u202eb",
]


def test_captions_are_printed_inert_and_json_stays_exact(fake_hub, tmp_path, capsys, monkeypatch):
    mine = LocalStore(tmp_path / "publisher")
    mine.publish_many([concept("cat", 1, EVIL_CAPTIONS), concept("dog", 2)], pack="mine")
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    monkeypatch.setenv("P2PZ_HOME", str(tmp_path / "consumer"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hub.UnknownEncoderWarning)
        assert cli.main(["pull", REPO]) == 0
    capsys.readouterr()
    assert cli.main(["show", f"{REPO}:cat"]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\u202e" not in shown
    assert "[/nonsense]" in shown and "[bold red]loud[/]" in shown  # markup printed literally
    assert "\\x1b]0;pwned\\x07title" in shown
    assert cli.main(["show", f"{REPO}:cat->dog"]) == 0
    assert "\x1b" not in capsys.readouterr().out
    assert cli.main(["show", f"{REPO}:cat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["captions_sample"] == EVIL_CAPTIONS


# -- resource bounds ------------------------------------------------------------------------------------
def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def test_an_index_that_decodes_to_gigabytes_is_refused_while_reading(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    n = 100_000
    big = "x" * 34_000  # 100 000 rows of it decode to 3.4 GB; dictionary-encoded, the file is small
    one = rows_of(fake_hub)[0]
    idx = pa.array([0] * n, pa.int32())
    cols = {}
    for k, t in pack_schema.INDEX_COLUMNS.items():
        v = big if k == "name" else one[k]
        typ = pa.string() if t == "string" else pa.int64()
        cols[k] = pa.nulls(n, typ) if v is None else pa.DictionaryArray.from_arrays(idx, pa.array([v], typ))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd", store_schema=False)
    assert len(buf.getvalue()) < 2_000_000
    fake_hub.upload(REPO, {"index.parquet": buf.getvalue()})
    measured = _peak_rss_reset()
    before = _peak_rss()
    t0 = time.monotonic()
    with pytest.raises(pack_schema.PackFormatError, match=r"row 1 .*too long"):
        pull(REPO, store=other)
    assert time.monotonic() - t0 < 20
    if measured:
        assert _peak_rss() - before < 600 * 1024**2  # batch by batch, never the 3.4 GB
    assert not other.pack_dir(REPO).exists()


def test_a_dribbling_server_is_cut_off_by_the_pull_deadline(fake_hub, stores):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    fake_hub.dribble("*/embedding.safetensors", interval=0.25)  # one byte per 0.25 s, never a read timeout
    t0 = time.monotonic()
    with pytest.raises(hub.DownloadDeadlineError, match="deadline"):
        pull(REPO, store=other, deadline_s=2.0)
    assert time.monotonic() - t0 < 8
    assert not other.pack_dir(REPO).exists()
    fake_hub.clear_faults()
    assert sorted(pull(REPO, store=other).added) == ["cat@1", "dog@1"]


# -- malformed pulled files ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "inject, why",
    [
        ('"x": NaN, ', "NaN"),
        ('"x": 1e999, ', "out of range"),
        ('"x": ' + "[" * 100_000 + "]" * 100_000 + ", ", "nested"),
        ('"x": "\\ud800", ', "surrogate"),
    ],
    ids=["nan", "1e999", "deep", "surrogate"],
)
def test_malformed_pulled_json_is_an_integrity_error_naming_the_file(fake_hub, stores, inject, why):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    path = meta_path(fake_hub, "cat")
    text = fake_hub.file(REPO, path).decode("utf-8")
    fake_hub.replace_in_pack(
        REPO, path, text.replace('"provenance": {', '"provenance": {' + inject, 1).encode()
    )
    with pytest.raises(IntegrityError, match=why) as e:
        pull(REPO, store=other)
    assert "concept.json" in str(e.value)
    assert not other.pack_dir(REPO).exists()


# -- pins ---------------------------------------------------------------------------------------------
def test_a_commit_pin_resolves_to_the_commit_never_a_tag_of_that_name(fake_hub, stores):
    mine, other = stores
    c1 = hub.push("mine", REPO, token=fake_hub.token, store=mine).commit
    mine.publish(concept("horse", 3), pack="mine")
    c2 = hub.push("mine", REPO, token=fake_hub.token, store=mine).commit
    fake_hub.tag(REPO, c1[:8], revision=c2)  # a tag that shadows the short commit id
    fake_hub.tag(REPO, "deadbeef", revision=c2)
    res = pull(f"{REPO}@{c1[:8]}", store=other)
    assert res.commit == c1 and len(other.entries(pack=REPO)) == 2
    assert other.pack_info(REPO).source["commit"] == c1
    assert pull(f"{REPO}@{c1.upper()}", store=other).commit == c1  # the full id, any case
    with pytest.raises(NotFoundError, match="no commit of alice/pack starts with 'deadbeef'"):
        pull(f"{REPO}@deadbeef", store=other)
    assert pull(f"{REPO}@refs/tags/deadbeef", store=other).commit == c2  # a tag by its full ref


def test_an_ambiguous_short_commit_is_refused():
    class Ref:
        def __init__(self, c):
            self.target_commit = c

    class Commit:
        def __init__(self, c):
            self.commit_id = c

    class Api:
        def list_repo_refs(self, repo_id, repo_type):
            return type("R", (), {"branches": [Ref("abcdef1" + "0" * 33)], "tags": []})()

        def list_repo_commits(self, repo_id, repo_type, revision):
            return [Commit("abcdef1" + "0" * 33), Commit("abcdef1" + "1" * 33), Commit("1234567" + "0" * 33)]

    with pytest.raises(AmbiguousNameError, match="2 commits"):
        hub._resolve_commit_pin(Api(), REPO, "abcdef1", "x")
    assert hub._resolve_commit_pin(Api(), REPO, "abcdef10", "x") == "abcdef1" + "0" * 33


# -- immutability across pulls ------------------------------------------------------------------------
def test_a_version_removed_then_readded_with_other_content_is_refused(fake_hub, stores, tmp_path):
    mine, other = stores
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    pull(REPO, store=other)
    honest = rows_of(fake_hub)
    honest_files = {r[k]: fake_hub.file(REPO, r[k]) for r in honest for k in ("tensor_path", "metadata_path")}
    # pull 1: the remote drops cat@1
    fake_hub.upload_index(REPO, [r for r in honest if r["name"] != "cat"])
    assert pull(REPO, store=other).removed == ["cat@1"]
    assert "local/clip-test0123456789ab\ncat\n1" in other.history(REPO)
    # pull 2: the remote brings cat@1 back, with other tensors
    row, files = other_content_rows(honest, tmp_path, "cat", 999)
    fake_hub.upload_index(REPO, [row, *(r for r in honest if r["name"] != "cat")], files)
    before = tree(other, REPO)
    with pytest.raises(ImmutableVersionError, match=r"cat@1 .*history was rewritten"):
        pull(REPO, store=other)
    assert tree(other, REPO) == before
    assert pull(REPO, store=other, force=True).added == ["cat@1"]
    # the honest content again is fine only with --force now: the store remembers the forced one
    fake_hub.upload_index(REPO, honest, honest_files)
    with pytest.raises(ImmutableVersionError):
        pull(REPO, store=other)


def test_pull_fetches_exactly_the_files_the_index_lists(fake_hub, stores):
    mine, other = stores
    mine.publish_many([concept(f"c{i}", 10 + i) for i in range(20)], pack="mine")
    hub.push("mine", REPO, token=fake_hub.token, store=mine)
    fake_hub.upload(REPO, {f"junk/{i}.bin": b"x" for i in range(50)})  # never fetched, never listed
    start = len(fake_hub.requests)
    pull(REPO, store=other)
    got = fake_hub.requests[start:]
    fetched = {
        r["path"].split("/resolve/", 1)[1].split("/", 1)[1]
        for r in got
        if r["method"] == "GET" and "/resolve/" in r["path"]
    }
    want = {"index.parquet"} | {r[k] for r in rows_of(fake_hub) for k in ("tensor_path", "metadata_path")}
    assert fetched == want
    assert not any("/tree/" in r["path"] for r in got)  # no listing, no pattern filter
