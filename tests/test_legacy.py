"""Legacy .pt import: the authors' files, shapes and dtypes, URLs, and refused pickles."""

from __future__ import annotations

import http.server
import os
import pickle
import threading

import pytest
import torch

from p2pz_directions import directions
from p2pz_directions.core.errors import FormatError, UnsafeFileError
from p2pz_directions.core.store import LocalStore
from p2pz_directions.packs.legacy import DownloadError, import_pt

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


def _serve(handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


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

    srv, base = _serve(H)
    yield www, base
    srv.shutdown()


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub's offline switch off (it reads HF_HUB_OFFLINE at import; conftest sets it)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_url_import_and_size_bound(http_dir, monkeypatch, authors_embeddings, online):
    www, base = http_dir
    (www / "cat.pt").write_bytes((authors_embeddings / "cat.pt").read_bytes())
    (www / "dog.pt").write_bytes((authors_embeddings / "dog.pt").read_bytes())
    got = import_pt([f"{base}/cat.pt", f"{base}/dog.pt"], encoder=CLIP_L, pack="web", progress=False)
    assert [c.name for c in got] == ["cat", "dog"]
    assert got[0].provenance["source"] == f"{base}/cat.pt"
    ref = torch.load(authors_embeddings / "cat.pt", weights_only=True, map_location="cpu")[0]
    assert torch.equal(directions.load_concept("cat").embedding, ref)

    monkeypatch.setenv("P2PZ_MAX_DOWNLOAD_BYTES", "1000")
    with pytest.raises(DownloadError, match="is [0-9]+ bytes, over the 1000-byte bound"):
        import_pt([f"{base}/dog.pt"], encoder=CLIP_L, pack="web2", progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        import_pt([f"{base}/nope.pt"], encoder=CLIP_L, pack="web2", progress=False)
    assert "web2" not in LocalStore().pack_names()


def test_offline_refuses_urls(monkeypatch):
    """Offline is huggingface_hub's own switch (its constant, read from HF_HUB_OFFLINE at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="offline mode"):
        import_pt(["https://example.invalid/cat.pt"], encoder=CLIP_L, progress=False)


# -- hostile .pt files: bounds from the metadata, before anything is materialised ---------------------
def test_stride0_view_claiming_terabytes_is_refused_before_allocating(tmp_path):
    huge = torch.zeros(1).expand(1, 77, 10**12)  # 308 TB if materialised; the file is tiny
    torch.save(huge, tmp_path / "huge.pt")
    assert (tmp_path / "huge.pt").stat().st_size < 4096
    big = torch.zeros(1).expand(77, 4_000_000)  # 1.2 GB if materialised
    torch.save(big, tmp_path / "big.pt")
    for f in ("huge.pt", "big.pt"):
        with pytest.raises(FormatError, match=r"D in 1\.\.8192"):
            import_pt([tmp_path / f], encoder="x/y", progress=False)
    # a stride-0 view of a legal shape is fine: it is copied into a dense [77, D]
    torch.save(torch.ones(1).expand(77, 16), tmp_path / "flat.pt")
    (c,) = import_pt([tmp_path / "flat.pt"], encoder="x/y", progress=False)
    assert c.embedding.shape == (77, 16) and c.embedding.stride() == (16, 1)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensors_are_refused_with_one_line(tmp_path, layout):
    dense = torch.zeros(77, 16)
    dense[3, 4] = 1.0
    t = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    torch.save(t, tmp_path / "sparse.pt")
    with pytest.raises(FormatError, match="sparse") as e:
        import_pt([tmp_path / "sparse.pt"], encoder="x/y", progress=False)
    assert "\n" not in str(e.value)
    assert LocalStore().entries() == []


@pytest.mark.parametrize("d", [0, 10_000])
def test_hidden_size_the_reader_refuses_is_refused_before_writing(tmp_path, d):
    torch.save(torch.zeros(77, d), tmp_path / "odd.pt")
    with pytest.raises(FormatError):
        import_pt([tmp_path / "odd.pt"], encoder="x/y", progress=False)
    assert not (LocalStore().root / "packs").exists() or LocalStore().entries() == []


def test_pre_1_6_format_and_compressed_archives_are_refused(tmp_path):
    torch.save(torch.zeros(77, 16), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match="pre-1.6"):
        import_pt([tmp_path / "old.pt"], encoder="x/y", progress=False)
    import zipfile

    torch.save(torch.zeros(77, 16), tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "zipped.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(FormatError, match="compressed"):
        import_pt([tmp_path / "zipped.pt"], encoder="x/y", progress=False)


def test_a_dribbling_server_is_cut_off_by_the_deadline(monkeypatch, online):
    import time

    class Dribble(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

    srv, base = _serve(Dribble)
    monkeypatch.setenv("P2PZ_DOWNLOAD_DEADLINE", "1")
    t0 = time.monotonic()
    try:
        with pytest.raises(DownloadError, match="P2PZ_DOWNLOAD_DEADLINE"):
            import_pt([f"{base}/cat.pt"], encoder="x/y", progress=False)
    finally:
        srv.shutdown()
    assert time.monotonic() - t0 < 5


def test_a_silent_server_is_cut_off_by_the_deadline_not_the_read_timeout(monkeypatch, online):
    """Headers, then nothing: huggingface_hub would wait its read timeout (10 s) five times over;
    the overall deadline ends it first."""
    import time

    class Silent(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            time.sleep(8)

    srv, base = _serve(Silent)
    monkeypatch.setenv("P2PZ_DOWNLOAD_DEADLINE", "1.5")
    t0 = time.monotonic()
    try:
        with pytest.raises(DownloadError, match=r"gave up after 1\.5 s"):
            import_pt([f"{base}/cat.pt"], encoder="x/y", progress=False)
    finally:
        srv.shutdown()
    assert time.monotonic() - t0 < 4


def test_a_body_longer_than_it_said_is_cut_at_the_bound(monkeypatch, online):
    """No Content-Length: the bound is counted while streaming, and the download stops there."""

    class Endless(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x" * 4096)
            except OSError:
                pass

    srv, base = _serve(Endless)
    monkeypatch.setenv("P2PZ_MAX_DOWNLOAD_BYTES", "10000")
    try:
        with pytest.raises(DownloadError, match="sent more, over the 10000-byte bound"):
            import_pt([f"{base}/x.pt"], encoder="x/y", progress=False)
    finally:
        srv.shutdown()


def test_a_bad_setting_is_a_clear_error(monkeypatch, online):
    from p2pz_directions.core.constants import ConfigError

    monkeypatch.setenv("P2PZ_DOWNLOAD_DEADLINE", "soon")
    with pytest.raises(ConfigError, match="P2PZ_DOWNLOAD_DEADLINE='soon' is not a number"):
        import_pt(["http://127.0.0.1:9/x.pt"], encoder="x/y", progress=False)
