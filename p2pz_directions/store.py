"""The local registry: packs of versioned, immutable, hash-checked concept embeddings.

Layout under the root (``$P2PZ_HOME``, default ``~/.cache/p2pz``)::

    .lock                                   the store's file lock (filelock)
    tmp/                                    versions being written; never read
    packs/<pack>/pack.json                  where the pack came from
    packs/<pack>/concepts/<encoder slug>/<concept name>/<version>/concept.json
                                                                 /embedding.safetensors

A version becomes visible in one ``rename`` of a fully written and fsynced folder, under the lock;
a crash before that leaves only a folder in ``tmp/`` that the next writer removes. A version
never changes: publishing other content under it raises `ImmutableVersionError`; the same
content again returns the existing version.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from . import naming
from .concept import Concept, EncoderInfo
from .errors import FormatError, ImmutableVersionError, IntegrityError, NotFoundError, StoreLockedError
from .format import (
    META_FILE,
    TENSOR_FILE,
    concept_content_hash,
    read_concept_dir,
    read_manifest,
    write_concept_dir,
)

DEFAULT_PACK = "local"
LOCK_TIMEOUT = float(os.environ.get("P2PZ_LOCK_TIMEOUT", "120"))


def default_root() -> Path:
    """``$P2PZ_HOME``, else ``$XDG_CACHE_HOME/p2pz``, else ``~/.cache/p2pz``."""
    env = os.environ.get("P2PZ_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "p2pz"


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pack_dirname(pack: str) -> str:
    """Folder name of a pack: a local name as is, a Hub repo id ``owner/name`` as ``owner--name``."""
    ref = naming.parse_pack(pack)
    if ref.revision:
        raise FormatError(f"pack {pack!r}: a revision is not part of a pack's local name")
    return ref.name.replace("/", "--")


@dataclass(frozen=True)
class Entry:
    """One stored concept version, known from its metadata alone (no tensor read)."""

    pack: str
    name: str
    version: int
    encoder: EncoderInfo
    content_hash: str
    created: str | None
    num_captions: int | None
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.pack}:{self.name}@{self.version}"


@dataclass(frozen=True)
class PackInfo:
    name: str
    path: Path
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    """A damaged file found by `LocalStore.verify`."""

    path: Path
    message: str


class LocalStore:
    """A registry folder. Safe to share between processes.

    >>> store = LocalStore("/tmp/p2pz-example")                       # doctest: +SKIP
    >>> stored = store.publish(concept, pack="mine")                  # doctest: +SKIP
    >>> [e.ref for e in store.entries(name="cat")]                    # doctest: +SKIP
    ['mine:cat@1']
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- paths and locking ---------------------------------------------------------------------
    @property
    def packs_root(self) -> Path:
        return self.root / "packs"

    def pack_dir(self, pack: str) -> Path:
        return self.packs_root / pack_dirname(pack)

    def version_dir(self, pack: str, encoder_id: str, name: str, version: int) -> Path:
        return self.pack_dir(pack) / "concepts" / naming.slug(encoder_id) / name / str(int(version))

    @contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the store's exclusive lock (re-entrant within one process)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lk = FileLock(str(self.root / ".lock"), timeout=LOCK_TIMEOUT if timeout is None else timeout)
        try:
            lk.acquire()
        except Timeout:
            raise StoreLockedError(
                f"another process has held the lock on {self.root} for over {lk.timeout:.0f} s; "
                f"wait for it to finish, or remove {self.root / '.lock'} if no p2pz process is running"
            ) from None
        try:
            yield
        finally:
            lk.release()

    def _tmp_dir(self) -> Path:
        tmp = self.root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        return tmp

    def _clean_tmp(self) -> None:
        """Remove folders left by writers that crashed (call under the lock)."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return
        for child in tmp.iterdir():
            pid = child.name.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            shutil.rmtree(child, ignore_errors=True)

    # -- packs ----------------------------------------------------------------------------------
    def packs(self) -> list[PackInfo]:
        if not self.packs_root.is_dir():
            return []
        out = []
        for d in sorted(self.packs_root.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                info = self._read_pack_json(d)
                out.append(PackInfo(info.get("name", d.name), d, info.get("source", {})))
        return out

    def pack_names(self) -> list[str]:
        return [p.name for p in self.packs()]

    def _read_pack_json(self, d: Path) -> dict[str, Any]:
        try:
            info = json.loads((d / "pack.json").read_text("utf-8"))
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {"name": d.name.replace("--", "/", 1) if "--" in d.name else d.name}

    def pack_info(self, pack: str) -> PackInfo:
        d = self.pack_dir(pack)
        if not d.is_dir():
            raise NotFoundError(
                f"no pack {pack!r} in {self.packs_root}; installed: {', '.join(self.pack_names()) or 'none'}"
            )
        info = self._read_pack_json(d)
        return PackInfo(info.get("name", pack), d, info.get("source", {}))

    def set_pack_info(self, pack: str, source: dict[str, Any] | None = None) -> None:
        """Create the pack if needed and record where it came from (atomic write)."""
        with self.lock():
            self._ensure_pack(pack, source)

    def _ensure_pack(self, pack: str, source: dict[str, Any] | None = None) -> Path:
        d = self.pack_dir(pack)
        d.mkdir(parents=True, exist_ok=True)
        pj = d / "pack.json"
        if source is None and pj.exists():
            return d
        info = {
            "name": naming.parse_pack(pack).name,
            "format_version": 1,
            "source": source if source is not None else {"type": "local"},
            "updated": now_iso(),
        }
        _atomic_write(pj, json.dumps(info, indent=1).encode("utf-8"))
        return d

    def remove_pack(self, pack: str) -> None:
        with self.lock():
            d = self.pack_dir(pack)
            if not d.is_dir():
                raise NotFoundError(f"no pack {pack!r} to remove")
            trash = self.root / "tmp" / f"{os.getpid()}-rm-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(d, trash)  # disappears at once, then is deleted
            shutil.rmtree(trash, ignore_errors=True)

    # -- reading --------------------------------------------------------------------------------
    def entries(
        self,
        pack: str | None = None,
        encoder: str | None = None,
        name: str | None = None,
        *,
        skip_damaged: bool = False,
    ) -> list[Entry]:
        """Every stored version matching the filters, from metadata only (hash-checked JSON).

        A damaged ``concept.json`` raises `IntegrityError`, or with ``skip_damaged`` is left out
        with a warning (for listings).
        """
        packs = [self.pack_info(pack)] if pack is not None else self.packs()
        out: list[Entry] = []
        for p in packs:
            croot = p.path / "concepts"
            if not croot.is_dir():
                continue
            enc_dirs = [croot / naming.slug(encoder)] if encoder else sorted(croot.iterdir())
            for ed in enc_dirs:
                if not ed.is_dir():
                    continue
                name_dirs = [ed / name] if name else sorted(ed.iterdir())
                for nd in name_dirs:
                    if not nd.is_dir():
                        continue
                    for vd in nd.iterdir():
                        if not (vd.is_dir() and vd.name.isdigit()):
                            continue
                        try:
                            meta = read_manifest(vd)
                        except IntegrityError as e:
                            if not skip_damaged:
                                raise
                            warnings.warn(str(e), stacklevel=2)
                            continue
                        out.append(
                            Entry(
                                pack=p.name,
                                name=meta["name"],
                                version=int(vd.name),
                                encoder=EncoderInfo.from_dict(meta["encoder"]),
                                content_hash=meta["content_hash"],
                                created=meta.get("created"),
                                num_captions=meta.get("num_captions"),
                                path=vd,
                            )
                        )
        out.sort(key=lambda e: (e.pack, e.encoder.id, e.name, e.version))
        return out

    def load(self, entry: Entry) -> Concept:
        """Read one version's tensor and metadata, checking every hash."""
        c = read_concept_dir(entry.path, pack=entry.pack)
        if c.version != entry.version or c.name != entry.name:
            raise IntegrityError(
                f"{entry.path / META_FILE} is corrupted: it says {c.name}@{c.version} but lies in the folder of "
                f"{entry.name}@{entry.version}. Run `p2pz verify`, then re-import or re-pull the pack."
            )
        return c

    # -- writing --------------------------------------------------------------------------------
    def publish(self, concept: Concept, pack: str = DEFAULT_PACK, version: int | None = None) -> Concept:
        """Store ``concept`` as a new immutable version and return it as stored.

        ``version=None`` takes ``concept.version`` if set, else the next free number. Equal content
        already stored returns that version unchanged; other content under an existing version
        raises `ImmutableVersionError`.
        """
        return self.publish_many([concept], pack=pack, versions=[version])[0]

    def publish_many(
        self,
        concepts: Sequence[Concept],
        pack: str = DEFAULT_PACK,
        versions: Sequence[int | None] | None = None,
        source: dict[str, Any] | None = None,
    ) -> list[Concept]:
        """Publish several concepts all or nothing: every conflict is found before anything is written."""
        versions = list(versions) if versions is not None else [None] * len(concepts)
        if len(versions) != len(concepts):
            raise ValueError("publish_many: give one version (or None) per concept")
        naming.parse_pack(pack)
        with self.lock():
            self._clean_tmp()
            plans: list[tuple[Concept, Path | None, Concept]] = []
            taken: dict[tuple[str, str], set[int]] = {}
            for concept, ver in zip(concepts, versions, strict=True):
                name = naming.normalize_concept(concept.name)
                chash = concept_content_hash(concept.with_(name=name))
                existing = (
                    {e.version: e for e in self.entries(pack=pack, encoder=concept.encoder.id, name=name)}
                    if self.pack_dir(pack).is_dir()
                    else {}
                )
                want = ver if ver is not None else concept.version
                same = [e for e in existing.values() if e.content_hash == chash]
                if want is None and same:
                    plans.append((concept, None, self.load(max(same, key=lambda e: e.version))))
                    continue
                if want is not None and want in existing:
                    if existing[want].content_hash == chash:
                        plans.append((concept, None, self.load(existing[want])))
                        continue
                    raise ImmutableVersionError(
                        f"{pack}:{name}@{want} for {concept.encoder.id} already exists with other content "
                        f"(content hash {existing[want].content_hash[:12]}..., yours {chash[:12]}...). Versions never "
                        f"change: publish without a version to get @{max(existing) + 1}, or use another pack."
                    )
                key = (concept.encoder.id, name)
                used = set(existing) | taken.setdefault(key, set())
                if want is None:
                    want = max(used, default=0) + 1
                elif want in used:
                    raise ImmutableVersionError(f"{name}@{want} appears twice in one publish")
                taken[key].add(want)
                final = concept.with_(
                    name=name,
                    version=int(want),
                    created=concept.created or now_iso(),
                    pack=naming.parse_pack(pack).name,
                )
                plans.append((concept, self.version_dir(pack, concept.encoder.id, name, want), final))
            if any(dest is not None for _, dest, _ in plans) or source is not None:
                self._ensure_pack(pack, source)
            out = []
            for _, dest, final in plans:
                if dest is None:
                    out.append(final)
                    continue
                tmp = self._tmp_dir()
                meta = write_concept_dir(final, tmp / "v")
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp / "v", dest)  # atomic: the version appears whole or not at all
                _fsync_dir(dest.parent)
                shutil.rmtree(tmp, ignore_errors=True)
                out.append(final.with_(content_hash=meta["content_hash"]))
            return out

    # -- checking -------------------------------------------------------------------------------
    def verify(self, pack: str | None = None) -> tuple[int, list[Problem]]:
        """Check every stored version (schema and hashes). Returns (versions checked, problems)."""
        problems: list[Problem] = []
        n = 0
        packs = [self.pack_info(pack)] if pack else self.packs()
        for p in packs:
            croot = p.path / "concepts"
            if not croot.is_dir():
                continue
            for meta_path in sorted(croot.glob(f"*/*/*/{META_FILE}")) + sorted(
                t.parent / META_FILE
                for t in croot.glob(f"*/*/*/{TENSOR_FILE}")
                if not (t.parent / META_FILE).exists()
            ):
                vd = meta_path.parent
                n += 1
                try:
                    c = read_concept_dir(vd, pack=p.name)
                    if str(c.version) != vd.name or c.name != vd.parent.name:
                        raise IntegrityError(
                            f"{meta_path}: says {c.name}@{c.version}, lies in {vd.parent.name}/{vd.name}"
                        )
                except (IntegrityError, FormatError) as e:
                    problems.append(Problem(vd, str(e)))
        return n, problems


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, fsync, then rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_DEFAULT: dict[str, LocalStore] = {}


def default_store() -> LocalStore:
    """The store at `default_root()` (re-read from the environment on each call)."""
    root = default_root()
    key = str(root)
    if key not in _DEFAULT:
        _DEFAULT[key] = LocalStore(root)
    return _DEFAULT[key]
