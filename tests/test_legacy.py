"""Legacy .pt import: the authors' files, shapes and dtypes, URLs, and refused pickles."""

from __future__ import annotations

import http.server
import os
import pickle
import threading

import pytest
import torch

from p2pz_directions import directions
from p2pz_directions.errors import FormatError, UnsafeFileError
from p2pz_directions.legacy import DownloadError, import_pt
from p2pz_directions.store import LocalStore

CLIP_L = "openai/clip-vit-large-patch14"
MARKER = "p2pz-pwned-marker"


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_authors_folder_imports_four_concepts(authors_embeddings):
    got = import_pt([authors_embeddings], pack="pix2pix-zero", encoder=CLIP_L, progress=False)
    assert [c.name for c in got] == ["cat", "dog", "horse", "zebra"]
    assert [c.dtype for c in got] == ["float32", "float32", "float16", "float16"]
    assert all(c.provenance["method"] == "legacy-import" for c in got)
    # importing again is a no-op: same content, same versions
    again = import_pt([authors_embeddings / "cat.pt"], pack="pix2pix-zero", encoder=CLIP_L, progress=False)
    assert again[0].version == 1 and again[0].content_hash == got[0].content_hash


def test_shapes_and_dtypes(tmp_path):
    torch.save(torch.randn(1, 77, 16), tmp_path / "a.pt")
    torch.save(torch.randn(77, 16).half(), tmp_path / "b.pt")
    got = import_pt([tmp_path / "a.pt", tmp_path / "b.pt"], encoder="test/enc", progress=False)
    assert [c.embedding.shape for c in got] == [(77, 16), (77, 16)]
    assert got[1].embedding.dtype == torch.float16
    assert got[0].encoder.hidden_size == 16  # an unknown encoder id takes D from the files


def test_wrong_shape_for_encoder_is_refused(tmp_path):
    torch.save(torch.randn(1, 77, 16), tmp_path / "a.pt")
    with pytest.raises(FormatError, match=r"\[77, 768\]. Check --encoder"):
        import_pt([tmp_path / "a.pt"], encoder=CLIP_L, progress=False)
    torch.save(torch.randn(2, 77, 16), tmp_path / "b.pt")
    with pytest.raises(FormatError, match=r"expected \[1, 77, D\] or \[77, D\]"):
        import_pt([tmp_path / "b.pt"], encoder="x/y", progress=False)
    torch.save({"a": 1, "b": 2}, tmp_path / "c.pt")
    with pytest.raises(FormatError, match="holds a dict"):
        import_pt([tmp_path / "c.pt"], encoder="x/y", progress=False)
    (tmp_path / "d.pt").write_bytes(b"not a torch file")
    with pytest.raises(UnsafeFileError, match="cannot read it as plain tensors.*damaged"):
        import_pt([tmp_path / "d.pt"], encoder="x/y", progress=False)
    assert LocalStore().entries() == []


def test_malicious_pickle_is_refused_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(torch.randn(77, 16), tmp_path / "good.pt")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Evil(), f)
    torch.save({"x": Evil()}, tmp_path / "evil2.pt")
    for bad in ("evil.pt", "evil2.pt"):
        with pytest.raises(UnsafeFileError, match="refused.*Nothing was imported"):
            import_pt([tmp_path / "good.pt", tmp_path / bad], encoder="x/y", progress=False)
    assert not (tmp_path / MARKER).exists()
    assert LocalStore().entries() == []


def test_missing_encoder_is_a_clear_error(tmp_path):
    torch.save(torch.randn(77, 16), tmp_path / "a.pt")
    with pytest.raises(ValueError, match="say which text encoder"):
        import_pt([tmp_path / "a.pt"], progress=False)
    with pytest.raises(FormatError, match="neither a file"):
        import_pt([tmp_path / "missing.pt"], encoder="x/y", progress=False)


@pytest.fixture
def http_dir(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1 and a free port."""
    www = tmp_path / "www"
    www.mkdir()

    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_url_import_and_size_bound(http_dir, monkeypatch, authors_embeddings):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    www, base = http_dir
    (www / "cat.pt").write_bytes((authors_embeddings / "cat.pt").read_bytes())
    (www / "dog.pt").write_bytes((authors_embeddings / "dog.pt").read_bytes())
    got = import_pt([f"{base}/cat.pt", f"{base}/dog.pt"], encoder=CLIP_L, pack="web", progress=False)
    assert [c.name for c in got] == ["cat", "dog"]
    assert got[0].provenance["source"] == f"{base}/cat.pt"
    ref = torch.load(authors_embeddings / "cat.pt", weights_only=True, map_location="cpu")[0]
    assert torch.equal(directions.load_concept("cat").embedding, ref)

    import p2pz_directions.legacy as legacy

    monkeypatch.setattr(legacy, "MAX_DOWNLOAD_BYTES", 1000)
    monkeypatch.setattr(legacy.download, "__defaults__", (1000, True))
    with pytest.raises(DownloadError, match="over the 1000-byte bound"):
        import_pt([f"{base}/dog.pt"], encoder=CLIP_L, pack="web2", progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        import_pt([f"{base}/nope.pt"], encoder=CLIP_L, pack="web2", progress=False)
    assert "web2" not in LocalStore().pack_names()


def test_offline_refuses_urls(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline mode"):
        import_pt(["https://example.invalid/cat.pt"], encoder=CLIP_L, progress=False)
