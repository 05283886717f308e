"""`p2pz push / pull / search / packs` end to end through cli.main, against the fake Hub."""

from __future__ import annotations

import json

import hub_server
import pytest
import torch

from p2pz_directions.cli import main
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.store import default_store
from p2pz_directions.packs import pack_schema

ENC = EncoderInfo("local/clip-test0123456789ab", 32, "clip")
fake_hub = hub_server.fake_hub  # the fixture


def run(capsys, *args):
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def published(fake_hub, monkeypatch):
    """Pack 'mine' (cat, dog) in the default store, HF_TOKEN set to alice's write token."""
    store = default_store()
    for i, n in enumerate(["cat", "dog"]):
        g = torch.Generator().manual_seed(i)
        store.publish(
            Concept(n, torch.randn(77, 32, generator=g).half(), ENC, captions=[f"a {n}"]), pack="mine"
        )
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    return store


def test_push_pull_packs_json(capsys, fake_hub, published):
    code, out, err = run(capsys, "push", "mine", "--repo", "alice/pack", "--tag", "v1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert (
        res["repo_id"] == "alice/pack" and res["tag"] == "v1" and sorted(res["added"]) == ["cat@1", "dog@1"]
    )
    assert res["commit"] == fake_hub.repo("alice/pack").tags["v1"]

    code, out, err = run(capsys, "pull", "alice/pack@v1", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["commit"] == res["commit"] and got["concepts"] == 2 and got["warnings"]
    code, out, _ = run(capsys, "pull", "alice/pack@v1")
    assert code == 0 and "up to date" in out

    code, out, _ = run(capsys, "packs", "--json")
    rows = {r["pack"]: r for r in json.loads(out)}
    assert rows["alice/pack"]["source"] == "hub" and rows["alice/pack"]["revision"] == "v1"
    assert rows["alice/pack"]["commit"] == res["commit"] and rows["mine"]["source"] == "local"
    code, out, _ = run(capsys, "packs")
    assert code == 0 and "alice/pack" in out and res["commit"][:10] in out

    code, out, _ = run(capsys, "show", "alice/pack:cat->dog", "--json")
    assert code == 0 and json.loads(out)["source"]["pack"] == "alice/pack"


def test_human_output_and_errors(capsys, fake_hub, published):
    code, out, err = run(capsys, "push", "mine", "--repo", "alice/pack")
    assert code == 0 and "pushed 2 concept version(s)" in out and "+ cat@1" in out
    code, out, _ = run(capsys, "push", "mine", "--repo", "alice/pack")
    assert code == 0 and "nothing to push" in out
    code, out, err = run(capsys, "pull", "alice/pack")
    assert (
        code == 0
        and "installed alice/pack@main" in out
        and "\nwarning: concept 'dog' also exists" in "\n" + err
    )

    code, out, err = run(capsys, "pull", "alice/missing")
    assert (
        code == 2
        and err.startswith("error: ")
        and "no such dataset repo" in err
        and len(err.splitlines()) == 1
    )
    code, out, err = run(capsys, "pull", "alice/pack@nope")
    assert code == 2 and "no revision 'nope'" in err
    code, out, err = run(capsys, "push", "mine", "--repo", "bob/pack")
    assert code == 2 and "403" in err
    code, out, err = run(capsys, "pull", "just-a-local-name")
    assert code == 2 and "owner/name" in err
    assert fake_hub.token not in out + err  # the token is never printed


def test_search_cli(capsys, fake_hub, published):
    code, out, _ = run(capsys, "search", "kitten", "into", "a", "puppy", "--json", "-k", "3")
    hits = json.loads(out)
    assert code == 0 and hits[0]["name"] == "cat->dog" and hits[0]["kind"] == "direction"
    run(capsys, "push", "mine", "--repo", "alice/pack")
    code, out, _ = run(capsys, "search", "a kitten", "--hub", "--json")
    assert code == 0 and any(h["kind"] == "hub" and h["name"] == "alice/pack" for h in json.loads(out))
    code, out, _ = run(capsys, "search", "a kitten")
    assert code == 0 and "mine:cat" in out


def test_packs_known(capsys, monkeypatch):
    listing = {
        "format": "p2pz-known-packs",
        "format_version": 1,
        "packs": [{"repo_id": "p2pz/animals", "description": "cats and dogs", "revision": "v1.0"}],
    }
    real = pack_schema.load_known_packs
    monkeypatch.setattr(pack_schema, "load_known_packs", lambda text=None: real(json.dumps(listing)))
    code, out, _ = run(capsys, "packs", "--known", "--json")
    rows = json.loads(out)
    assert code == 0 and rows == [
        {
            "repo_id": "p2pz/animals",
            "revision": "v1.0",
            "description": "cats and dogs",
            "encoders": [],
            "license": None,
            "installed": None,
            "pull": "p2pz pull p2pz/animals@v1.0",
        }
    ]
    code, out, _ = run(capsys, "packs", "--known")
    assert code == 0 and "p2pz/animals" in out and "v1.0" in out and "cats and dogs" in out
