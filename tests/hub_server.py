"""A fake Hugging Face Hub for tests: the part of the Hub's REST API that huggingface_hub and datasets use.

The *unmodified* ``huggingface_hub`` and ``datasets`` clients talk to it over real HTTP on
127.0.0.1 (a free port), through the endpoint constants the `fake_hub` fixture points at it. It
keeps repos in memory with git-like history: content-addressed blobs (git blob sha1), commits with
parents, branches and tags.

Speaks: ``whoami-v2``, ``repos/create``, repo info (``/api/{type}s/{id}[/revision/{rev}]``),
``tree`` (recursive, paginated), ``paths-info``, ``refs``, ``tag``, ``commits``, ``preupload``
(every file ``regular``: no LFS, no Xet, so the client sends content inline), ``commit`` (NDJSON),
``validate-yaml``, dataset listing (``/api/datasets?filter=&search=``) and ``resolve`` (HEAD/GET
with ETag, ``X-Repo-Commit``, ``Range``). The server never sends Xet headers, so the client takes
its plain HTTP path.

Fault injection (all thread-safe, each optionally limited to ``times`` uses)::

    hub.fail(status=404, path="*/resolve/*", method="GET")     # answer with an error
    hub.cut("*/embedding.safetensors", after=100)              # close the socket mid-body
    hub.tamper("me/pack", "index.parquet")                     # serve other bytes, same ETag
    hub.dribble("*/embedding.safetensors", interval=0.3)       # one byte per interval, forever

Hostile packs (issue 15/18: each case a fixture a test pulls)::

    hub.replace_in_pack("eve/pack", "concepts/.../concept.json", b"...")   # and fix the index row to match
    hub.upload_index("eve/pack", rows)                                     # any rows, as a raw index.parquet

Auth: tokens are registered with `FakeHub.add_token`; private repos answer 401 (no token) or 404
(a token without access) with ``X-Error-Code: RepoNotFound``, like the Hub; writes need a write
token whose user owns the namespace (403 otherwise).

Example::

    def test_push(fake_hub):
        api = HfApi(token=fake_hub.token)
        api.create_repo("alice/pack", repo_type="dataset")
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.parquet filter=lfs diff=lfs merge=lfs -text\n"
)
TREE_PAGE = 1000
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    oid: str
    parent: str | None
    tree: dict[str, str]  # path -> blob oid
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=_now)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, rev: str) -> str | None:
        """Commit oid of a branch, tag, full or (unique, >= 7 chars) short commit id."""
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        for prefix in ("refs/heads/", "refs/tags/"):
            if rev.startswith(prefix):
                return self.resolve(rev[len(prefix) :])
        if rev in self.commits:
            return rev
        if len(rev) >= 7:
            hits = [c for c in self.commits if c.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None


@dataclass
class Fault:
    """One injected fault; ``times=None`` means forever."""

    kind: str  # "status" | "cut" | "dribble"
    path: str  # fnmatch pattern on the URL path (unquoted, without query)
    method: str | None = None
    status: int = 500
    message: str = ""
    error_code: str | None = None
    after: int = 0  # bytes of body sent before a cut
    interval: float = 0.0  # seconds between the bytes of a dribble
    times: int | None = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and fnmatch.fnmatchcase(path, self.path)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """In-memory Hub state plus the HTTP server that serves it (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.tokens: dict[str, tuple[str, str]] = {}  # token -> (user, role)
        self.faults: list[Fault] = []
        self.tampered: dict[tuple[str, str, str], Callable[[bytes], bytes]] = {}
        self.requests: list[dict[str, Any]] = []
        self.unknown: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self.token = self.add_token("alice", "write", "hf_fake_write_alice_0123456789")
        self.read_token = self.add_token("bob", "read", "hf_fake_read_bob_0123456789")

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- set-up helpers -----------------------------------------------------------------------
    def add_token(self, user: str, role: str = "write", token: str | None = None) -> str:
        token = token or f"hf_fake_{user}_{role}_{len(self.tokens)}"
        self.tokens[token] = (user, role)
        return token

    def create_repo(self, repo_id: str, repo_type: str = "dataset", private: bool = False) -> Repo:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise HubError(409, "You already created this repo")
            repo = Repo(repo_id, repo_type, private=private)
            self.repos[key] = repo
            self._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit", repo.owner)
            return repo

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def upload(
        self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "dataset", message: str = "upload"
    ) -> str:
        """Commit files directly (no HTTP): for building odd repos in tests. Returns the commit oid."""
        with self.lock:
            if (repo_type, repo_id) not in self.repos:
                self.create_repo(repo_id, repo_type)
            repo = self.repo(repo_id, repo_type)
            return self._commit(repo, "main", files, [], message, repo.owner).oid

    def tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "dataset") -> None:
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            repo.tags[tag] = repo.resolve(revision)

    def file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "dataset") -> bytes:
        repo = self.repo(repo_id, repo_type)
        return self.blobs[repo.commits[repo.resolve(revision)].tree[path]]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        repo = self.repo(repo_id, repo_type)
        tree = repo.commits[repo.resolve(revision)].tree
        return {p: self.blobs[o] for p, o in tree.items()}

    # -- faults -------------------------------------------------------------------------------
    def fail(
        self,
        status: int,
        path: str = "*",
        *,
        method: str | None = None,
        times: int | None = 1,
        message: str = "",
        error_code: str | None = None,
    ) -> Fault:
        """Answer matching requests with ``status`` (and an ``X-Error-Code`` if given)."""
        f = Fault("status", path, method, status=status, message=message, error_code=error_code, times=times)
        with self.lock:
            self.faults.append(f)
        return f

    def cut(self, path: str, after: int = 0, *, times: int | None = 1) -> Fault:
        """Send the headers and ``after`` bytes of a GET body, then close the connection."""
        f = Fault("cut", path, "GET", after=after, times=times)
        with self.lock:
            self.faults.append(f)
        return f

    def dribble(self, path: str, interval: float = 0.3, *, times: int | None = None) -> Fault:
        """Answer a GET with the headers, then one byte of the body every ``interval`` seconds."""
        f = Fault("dribble", path, "GET", interval=interval, times=times)
        with self.lock:
            self.faults.append(f)
        return f

    # -- hostile packs ------------------------------------------------------------------------
    def replace_in_pack(self, repo_id: str, path: str, data: bytes, *, fix_index: bool = True) -> str:
        """Commit other bytes for ``path``; with ``fix_index`` the index row's sha256 and size follow,
        so only the deeper checks (JSON, schema, hashes inside concept.json) can catch it."""
        import io

        import pyarrow.parquet as pq

        files = {path: data}
        if fix_index:
            table = pq.read_table(io.BytesIO(self.file(repo_id, "index.parquet")))
            rows = table.to_pylist()
            for r in rows:
                if r["metadata_path"] == path:
                    r["metadata_sha256"], r["metadata_size"] = hashlib.sha256(data).hexdigest(), len(data)
                if r["tensor_path"] == path:
                    r["sha256"], r["size"] = hashlib.sha256(data).hexdigest(), len(data)
            files["index.parquet"] = self._parquet(rows, table.schema)
        return self.upload(repo_id, files, message=f"hostile: {path}")

    def upload_index(self, repo_id: str, rows: list[dict], extra: dict[str, bytes] | None = None) -> str:
        """Commit ``rows`` as the pack's index.parquet (no checks at all), plus ``extra`` files."""
        from p2pz_directions.packs.pack_schema import index_schema

        return self.upload(
            repo_id, {"index.parquet": self._parquet(rows, index_schema()), **(extra or {})}, message="index"
        )

    @staticmethod
    def _parquet(rows: list[dict], schema) -> bytes:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
        return buf.getvalue()

    def tamper(
        self,
        repo_id: str,
        path: str,
        change: Callable[[bytes], bytes] | None = None,
        repo_type: str = "dataset",
    ) -> None:
        """Serve other bytes for ``path`` (default: one byte flipped mid-file), same ETag and size."""
        with self.lock:
            self.tampered[(repo_type, repo_id, path)] = change or _flip_middle_byte

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()
            self.tampered.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.matches(method, path) and (f.times is None or f.hits < f.times):
                    f.hits += 1
                    return f
        return None

    def count(self, method: str | None = None, path: str = "*") -> int:
        """How many requests matched (for assertions on traffic)."""
        return sum(
            1
            for r in self.requests
            if (method is None or r["method"] == method) and fnmatch.fnmatchcase(r["path"], path)
        )

    # -- state changes ------------------------------------------------------------------------
    def _commit(
        self,
        repo: Repo,
        branch: str,
        adds: dict[str, bytes],
        deletes: list[str],
        title: str,
        author: str,
        message: str = "",
        parent_check: str | None = None,
    ) -> Commit:
        with self.lock:
            head = repo.branches.get(branch)
            if parent_check is not None and (head is None or not head.startswith(parent_check)):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head].tree) if head else {}
            for d in deletes:
                if d.endswith("/"):
                    for p in [p for p in tree if p.startswith(d)]:
                        del tree[p]
                elif d in tree:
                    del tree[d]
                elif any(p.startswith(d + "/") for p in tree):
                    for p in [p for p in tree if p.startswith(d + "/")]:
                        del tree[p]
                else:
                    raise HubError(404, f"File not found: {d}", "EntryNotFound")
            for path, data in adds.items():
                oid = git_blob_sha1(data)
                self.blobs[oid] = data
                tree[path] = oid
            self._counter += 1
            raw = json.dumps([head, sorted(tree.items()), title, self._counter, time.time()]).encode()
            oid = hashlib.sha1(raw).hexdigest()
            c = Commit(oid, head, tree, title, message, author, _now())
            repo.commits[oid] = c
            repo.branches[branch] = oid
            return c

    # -- views --------------------------------------------------------------------------------
    def card_data(self, repo: Repo, commit: Commit) -> dict[str, Any] | None:
        oid = commit.tree.get("README.md")
        if oid is None:
            return None
        text = self.blobs[oid].decode("utf-8", "replace")
        if not text.startswith("---"):
            return None
        end = text.find("\n---", 3)
        if end < 0:
            return None
        import yaml

        try:
            data = yaml.safe_load(text[3:end])
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def info(self, repo: Repo, commit: Commit, blobs: bool = False) -> dict[str, Any]:
        card = self.card_data(repo, commit) or {}
        tags = (
            [t for t in card.get("tags", []) if isinstance(t, str)]
            if isinstance(card.get("tags"), list)
            else []
        )
        if isinstance(card.get("license"), str):
            tags.append(f"license:{card['license']}")
        siblings = []
        for path, oid in sorted(commit.tree.items()):
            s: dict[str, Any] = {"rfilename": path}
            if blobs:
                s.update(size=len(self.blobs[oid]), blobId=oid)
            siblings.append(s)
        return {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "cardData": card or None,
            "description": card.get("pretty_name") if isinstance(card.get("pretty_name"), str) else None,
            "siblings": siblings,
        }


def _flip_middle_byte(data: bytes) -> bytes:
    if not data:
        return b"x"
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the `FakeHub` (set as the class attribute ``fake``)."""

    fake: FakeHub
    # headers and body go in two writes: no 40 ms delayed-ACK stall per request
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        hdrs.setdefault("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), headers)

    def _error(self, e: HubError) -> None:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.message:
            headers["X-Error-Message"] = e.message
        self._json({"error": e.message}, e.status, headers)

    def _user(self) -> tuple[str, str] | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        if not auth.startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")
        who = self.fake.tokens.get(auth[len("Bearer ") :].strip())
        if who is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return who

    def _dispatch(self, method: str) -> None:
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        self.fake.requests.append(
            {
                "method": method,
                "path": path,
                "query": query,
                "range": self.headers.get("Range"),
                "auth": bool(self.headers.get("Authorization")),
            }
        )
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        try:
            fault = self.fake._take_fault(method, path)
            if fault is not None and fault.kind == "status":
                raise HubError(fault.status, fault.message or f"injected {fault.status}", fault.error_code)
            self._route(method, split.path, path, query, body, fault)
        except HubError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- routing -------------------------------------------------------------------------------
    def _route(
        self, method: str, raw_path: str, path: str, query: dict, body: bytes, fault: Fault | None
    ) -> None:
        parts = [urllib.parse.unquote(p) for p in raw_path.strip("/").split("/")]
        if parts[:2] == ["api", "whoami-v2"]:
            return self._whoami()
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if parts[:2] == ["api", "agent-harnesses"]:
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if parts[:2] == ["api", "validate-yaml"]:
            return self._json({"errors": [], "warnings": []})
        if len(parts) == 2 and parts[0] == "api" and parts[1] in TYPES and method == "GET":
            return self._list_repos(TYPES[parts[1]], query)
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in TYPES:
            repo_type = TYPES[parts[1]]
            repo_id = f"{parts[2]}/{parts[3]}"
            return self._repo_api(method, repo_type, repo_id, parts[4:], query, body)
        # /[datasets/]owner/name/resolve/rev/path
        rest = parts
        repo_type = "model"
        if rest and rest[0] in TYPES and len(rest) >= 5 and rest[3] == "resolve":
            repo_type, rest = TYPES[rest[0]], rest[1:]
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(
                method, repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]), fault
            )
        self.fake.unknown.append(f"{method} {self.path}")
        raise HubError(404, f"fake hub: no route for {method} {path}")

    def _get_repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        who = self._user()
        repo = self.fake.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and (who is None or who[0] != repo.owner)):
            if who is None:
                raise HubError(401, "Repository not found", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.gated and (who is None or who[0] != repo.owner):
            raise HubError(403, "Access to this dataset is restricted", "GatedRepo")
        if write:
            if who is None:
                raise HubError(401, "You must be authenticated to write", "RepoNotFound")
            if who[1] != "write" or who[0] != repo.owner:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        oid = repo.resolve(rev)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[oid]

    # -- endpoints -----------------------------------------------------------------------------
    def _whoami(self) -> None:
        who = self._user()
        if who is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(
            {
                "type": "user",
                "name": who[0],
                "fullname": who[0].title(),
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": who[1]}},
            }
        )

    def _create_repo(self, payload: dict) -> None:
        who = self._user()
        if who is None:
            raise HubError(401, "You must be authenticated to create a repo")
        ns = payload.get("organization") or who[0]
        if who[1] != "write" or ns != who[0]:
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {ns!r}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{ns}/{payload['name']}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self.fake.create_repo(repo_id, repo_type, private=private)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._json({"url": f"{self.fake.url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def _list_repos(self, repo_type: str, query: dict) -> None:
        who = self._user()
        filters = [f for v in query.get("filter", []) for f in v.split(",") if f]
        search = (query.get("search") or [""])[0].lower()
        author = (query.get("author") or [None])[0]
        limit = int((query.get("limit") or ["0"])[0] or 0)
        out = []
        with self.fake.lock:
            repos = [r for r in self.fake.repos.values() if r.repo_type == repo_type]
        for repo in sorted(repos, key=lambda r: r.repo_id):
            if repo.private and (who is None or who[0] != repo.owner):
                continue
            info = self.fake.info(repo, repo.commits[repo.branches["main"]])
            if any(f not in info["tags"] for f in filters):
                continue
            if search and search not in repo.repo_id.lower():
                continue
            if author and repo.owner != author:
                continue
            info.pop("siblings")
            out.append(info)
        self._json(out[:limit] if limit else out)

    def _repo_api(
        self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict, body: bytes
    ) -> None:
        if not rest and method == "GET":
            repo = self._get_repo(repo_type, repo_id)
            blobs = (query.get("blobs") or ["false"])[0].lower() in ("1", "true")
            return self._json(self.fake.info(repo, self._commit_at(repo, "main"), blobs))
        op = rest[0] if rest else ""
        if op == "revision" and method == "GET":
            repo = self._get_repo(repo_type, repo_id)
            blobs = (query.get("blobs") or ["false"])[0].lower() in ("1", "true")
            return self._json(self.fake.info(repo, self._commit_at(repo, "/".join(rest[1:])), blobs))
        if op == "refs" and method == "GET":
            repo = self._get_repo(repo_type, repo_id)
            return self._json(
                {
                    "branches": [
                        {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                        for n, c in repo.branches.items()
                    ],
                    "tags": [
                        {"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()
                    ],
                    "converts": [],
                    "pullRequests": [],
                }
            )
        if op == "tree" and method == "GET":
            repo = self._get_repo(repo_type, repo_id)
            commit = self._commit_at(repo, rest[1])
            return self._tree(repo, commit, "/".join(rest[2:]), query)
        if op == "paths-info" and method == "POST":
            repo = self._get_repo(repo_type, repo_id)
            commit = self._commit_at(repo, "/".join(rest[1:]))
            form = urllib.parse.parse_qs(body.decode("utf-8"))
            paths = form.get("paths", [])
            if not paths and body.strip().startswith(b"{"):
                paths = json.loads(body).get("paths", [])
            return self._json([e for p in paths for e in self._entries(commit, p.strip("/"), exact=True)])
        if op == "commits" and method == "GET":
            repo = self._get_repo(repo_type, repo_id)
            c: Commit | None = self._commit_at(repo, "/".join(rest[1:]))
            out = []
            while c is not None:
                out.append(
                    {
                        "id": c.oid,
                        "title": c.title,
                        "message": c.message,
                        "authors": [{"user": c.author}],
                        "date": c.date,
                    }
                )
                c = repo.commits.get(c.parent) if c.parent else None
            return self._json(out)
        if op == "tag" and method == "POST":
            repo = self._get_repo(repo_type, repo_id, write=True)
            commit = self._commit_at(repo, "/".join(rest[1:]))
            tag = json.loads(body or b"{}").get("tag")
            with self.fake.lock:
                if not tag or tag in repo.tags or tag in repo.branches:
                    raise HubError(409, f"Tag {tag!r} already exists")
                repo.tags[tag] = commit.oid
            return self._json({})
        if op == "tag" and method == "DELETE":
            repo = self._get_repo(repo_type, repo_id, write=True)
            with self.fake.lock:
                if repo.tags.pop("/".join(rest[1:]), None) is None:
                    raise HubError(404, "Tag not found", "RevisionNotFound")
            return self._json({})
        if op == "preupload" and method == "POST":
            repo = self._get_repo(repo_type, repo_id, write=True)
            branch = "/".join(rest[1:])
            head = repo.resolve(branch)
            tree = repo.commits[head].tree if head else {}
            files = json.loads(body or b"{}").get("files", [])
            return self._json(
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "regular",  # never LFS / Xet: content goes inline in the commit
                            "shouldIgnore": False,
                            "oid": tree.get(f["path"]),
                        }
                        for f in files
                    ],
                    "commitOid": head,
                }
            )
        if op == "commit" and method == "POST":
            repo = self._get_repo(repo_type, repo_id, write=True)
            return self._do_commit(repo, "/".join(rest[1:]), body, query)
        self.fake.unknown.append(f"{method} {self.path}")
        raise HubError(404, f"fake hub: no route for {method} {'/'.join(rest)}")

    def _entries(self, commit: Commit, path: str, exact: bool = False) -> list[dict[str, Any]]:
        tree = commit.tree
        if path in tree:
            return [self._file_entry(path, tree[path])]
        prefix = path + "/" if path else ""
        if exact:
            if any(p.startswith(prefix) for p in tree):
                return [{"type": "directory", "oid": _tree_oid(commit, prefix), "path": path}]
            return []
        return []

    def _file_entry(self, path: str, oid: str) -> dict[str, Any]:
        return {"type": "file", "oid": oid, "size": len(self.fake.blobs[oid]), "path": path}

    def _tree(self, repo: Repo, commit: Commit, path: str, query: dict) -> None:
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.tree):
            if path.strip("/") in commit.tree:
                raise HubError(400, f"{path} is a file, not a folder")
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for p, oid in commit.tree.items():
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :]
            segs = rel.split("/")
            for i in range(1, len(segs)):
                d = prefix + "/".join(segs[:i])
                if (recursive or i == 1) and d not in entries:
                    entries[d] = {"type": "directory", "oid": _tree_oid(commit, d + "/"), "path": d}
                if not recursive:
                    break
            if recursive or len(segs) == 1:
                entries[p] = self._file_entry(p, oid)
        items = [entries[k] for k in sorted(entries)]
        cursor = int((query.get("cursor") or ["0"])[0] or 0)
        page = items[cursor : cursor + TREE_PAGE]
        headers = {}
        if cursor + TREE_PAGE < len(items):
            q = {k: v[0] for k, v in query.items()}
            q["cursor"] = str(cursor + TREE_PAGE)
            url = f"{self.fake.url}{urllib.parse.urlsplit(self.path).path}?{urllib.parse.urlencode(q)}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._json(page, headers=headers)

    def _do_commit(self, repo: Repo, branch: str, body: bytes, query: dict) -> None:
        if (query.get("create_pr") or ["0"])[0] in ("1", "true"):
            raise HubError(400, "the fake hub does not do pull requests")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
        header: dict[str, Any] = {}
        adds: dict[str, bytes] = {}
        deletes: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, "only base64 content is supported")
                adds[_clean_path(value["path"])] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deletes.append(_clean_path(value["path"]))
            elif key == "deletedFolder":
                deletes.append(_clean_path(value["path"]).rstrip("/") + "/")
            elif key == "lfsFile":
                raise HubError(400, "the fake hub accepts regular uploads only (it never asks for LFS)")
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "commit summary is required")
        who = self._user()
        c = self.fake._commit(
            repo,
            branch,
            adds,
            deletes,
            summary,
            who[0] if who else "anonymous",
            header.get("description", ""),
            parent_check=header.get("parentCommit"),
        )
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._json(
            {
                "success": True,
                "commitOid": c.oid,
                "commitUrl": f"{self.fake.url}/{prefix}{repo.repo_id}/commit/{c.oid}",
                "hookOutput": "",
            }
        )

    def _resolve(
        self, method: str, repo_type: str, repo_id: str, rev: str, path: str, fault: Fault | None
    ) -> None:
        repo = self._get_repo(repo_type, repo_id)
        oid = repo.resolve(rev)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        commit = repo.commits[oid]
        blob = commit.tree.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        data = self.fake.blobs[blob]
        change = self.fake.tampered.get((repo_type, repo_id, path))
        if change is not None:
            data = change(data)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        status = 200
        rng = self.headers.get("Range")
        start, end = 0, len(data) - 1
        if rng and method == "GET":
            try:
                unit, spec = rng.split("=", 1)
                a, b = spec.split(",")[0].split("-")
                if unit.strip() != "bytes":
                    raise ValueError
                if a == "":
                    start = max(len(data) - int(b), 0)
                else:
                    start = int(a)
                    end = min(int(b), len(data) - 1) if b else len(data) - 1
            except ValueError:
                raise HubError(400, f"bad Range header {rng!r}") from None
            if start >= len(data) and len(data) > 0:
                raise HubError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        payload = data[start : end + 1]
        headers["Content-Length"] = str(len(payload))
        if method == "HEAD" or fault is None or fault.kind not in ("cut", "dribble"):
            return self._send(status, payload, headers)
        if fault.kind == "dribble":  # a server that never quite stops sending
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            try:
                for i in range(len(payload)):
                    self.wfile.write(payload[i : i + 1])
                    self.wfile.flush()
                    time.sleep(fault.interval)
            except OSError:
                pass
            self.close_connection = True
            return None
        # injected cut: promise the whole body, send part of it, drop the connection
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload[: fault.after])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _tree_oid(commit: Commit, prefix: str) -> str:
    items = sorted((p, o) for p, o in commit.tree.items() if p.startswith(prefix))
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()


def _clean_path(path: str) -> str:
    p = path.strip("/")
    if not p or any(s in ("", ".", "..") for s in p.split("/")):
        raise HubError(400, f"invalid path {path!r}")
    return p


def point_clients_at(url: str, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub and datasets (already imported or not) at ``url``, online, caching under ``cache``."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(hc, "ENDPOINT", url)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hc, "HF_URL_HOSTS", frozenset(set(hc.HF_URL_HOSTS) | {"127.0.0.1"}))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(hc, "HF_HOME", str(cache))
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(cache / "token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(cache / "stored_tokens"))
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    try:
        import datasets.config as dc
    except ImportError:  # datasets is a test extra
        return
    monkeypatch.setattr(dc, "HF_ENDPOINT", url)
    monkeypatch.setattr(dc, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dc, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(dc, "HF_MODULES_CACHE", cache / "modules")
    monkeypatch.setattr(dc, "DOWNLOADED_DATASETS_PATH", cache / "datasets" / "downloads")
    monkeypatch.setattr(dc, "EXTRACTED_DATASETS_PATH", cache / "datasets" / "downloads" / "extracted")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> Iterator[FakeHub]:
    """A running fake Hub, with huggingface_hub and datasets pointed at it and online for this test.

    Its own endpoint per test (fresh port), so no client cache sees another test's repos. The
    HF cache lives in ``tmp_path / "hf"``; ``fake_hub.token`` writes as user ``alice``.
    """
    hub = FakeHub().start()
    point_clients_at(hub.url, monkeypatch, tmp_path / "hf")
    try:
        yield hub
    finally:
        hub.stop()
        from huggingface_hub.utils import close_session

        close_session()  # no keep-alive connection to a dead port in the next test
