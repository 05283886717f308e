"""The local registry: packs of versioned, immutable, hash-checked concept embeddings.

Layout under the root (``$P2PZ_HOME``, default ``~/.cache/p2pz``)::

    .lock                                   the store's file lock (filelock)
    txn/<pid>-<id>/                         a transaction: items being written, then journal.json
    tmp/                                    scratch of writers; never read
    packs/<pack folder>/pack.json           where the pack came from
    packs/<pack folder>/versions.json       every version the pack ever held, with its content hash
    packs/<pack folder>/concepts/<encoder slug>/<name component>/<version>/concept.json
                                                                          /embedding.safetensors
    packs/<pack folder>/evals/<record id>.json                           evaluation records

A pack folder is `naming.pack_folder` of its name (``alice/pack`` -> ``alice--pack``; no local
name holds ``--``, so the two never meet). Below it the layout is the Hub pack's layout
(`pack_schema.concept_dir`: the concept name itself when it is a plain ``[a-z0-9._-]`` word, else
a slug plus 8 hex of its sha256), so a pull downloads the repo's files straight into a staged pack
folder (`stage_pack`) and swaps it in: one copy on disk. Folders named by the raw concept name
(stores written before this layout) are still read.

Writes are transactions, all or nothing as a whole: under the lock, every new version (and the
new ``pack.json`` / ``versions.json``, or a whole replacement pack folder for a pull) is written
and fsynced inside ``txn/<pid>-<id>/items/``; then ``journal.json`` is written atomically (the
commit point) listing the renames; then the renames are done and the transaction folder removed.
A crash before the journal leaves a folder that the next open removes; a crash after it is rolled
forward by the next open (readers that meet a committed journal wait for the lock and finish it
first), so a reader never sees half a publish and an installed pack is never lost. Stale temp
files of dead writers are removed on open.

A version never changes: publishing other content under it raises `ImmutableVersionError`; the
same content again returns the existing version. ``versions.json`` remembers every version a pack
ever held, so a version number is never reused for other content, even after the version left the
pack (a pull of a revision without it).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from p2pz_directions.core import constants, naming
from p2pz_directions.core.atomic import write_bytes
from p2pz_directions.core.concept import Concept, EncoderInfo
from p2pz_directions.core.errors import (
    FormatError,
    ImmutableVersionError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    P2PZError,
    StoreLockedError,
)
from p2pz_directions.core.format import (
    META_FILE,
    TENSOR_FILE,
    JSONRefused,
    concept_content_hash,
    prepare_concept,
    read_concept_dir,
    read_file_bounded,
    read_manifest,
    strict_json,
)
from p2pz_directions.packs.pack_schema import concept_dir, name_component

DEFAULT_PACK = "local"
JOURNAL = "journal.json"
HISTORY_FILE = "versions.json"
PACK_FILE = "pack.json"
MAX_PACK_JSON_BYTES = 1024 * 1024
MAX_HISTORY_BYTES = 64 * 1024 * 1024

_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()
_ACTIVE_TXNS: set[str] = set()  # transaction folders this process is writing


def default_root() -> Path:
    """``$P2PZ_HOME``, else ``$XDG_CACHE_HOME/p2pz``, else ``~/.cache/p2pz`` (`constants.home`)."""
    return constants.home()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pack_dirname(pack: str) -> str:
    """Folder name of a pack: a local name as is, a Hub repo id ``owner/name`` as ``owner--name``
    (lower-case; see `naming.pack_folder`)."""
    ref = naming.parse_pack(pack)
    if ref.revision:
        raise FormatError(f"pack {pack!r}: a revision is not part of a pack's local name")
    return naming.pack_folder(ref)


def _history_key(encoder_id: str, name: str, version: int) -> str:
    return f"{encoder_id}\n{name}\n{int(version)}"


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


@dataclass
class StagedVersion:
    """One version for `LocalStore.install_pack`: its two files lie in the staged pack folder at
    `pack_schema.concept_dir` (the Hub's path), already checked by the caller."""

    encoder_id: str
    name: str
    version: int


class PackClashError(P2PZError, ValueError):
    """A pull would replace a pack that did not come from that Hub repo (a local pack)."""


class LocalStore:
    """A registry folder. Safe to share between processes.

    >>> store = LocalStore("/tmp/p2pz-example")                       # doctest: +SKIP
    >>> stored = store.publish(concept, pack="mine")                  # doctest: +SKIP
    >>> [e.ref for e in store.entries(name="cat")]                    # doctest: +SKIP
    ['mine:cat@1']
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self._opened = False

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- paths and locking ---------------------------------------------------------------------
    @property
    def packs_root(self) -> Path:
        return self.root / "packs"

    def pack_dir(self, pack: str) -> Path:
        return self.packs_root / pack_dirname(pack)

    def version_dir(self, pack: str, encoder_id: str, name: str, version: int) -> Path:
        """Where a version is written: the Hub pack's path (`pack_schema.concept_dir`) in the pack folder."""
        return self.pack_dir(pack) / concept_dir(encoder_id, name, version)

    @contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the store's exclusive lock (re-entrant within one thread of one process)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = str((self.root / ".lock").resolve())
        with _LOCKS_GUARD:
            lk = _LOCKS.get(path)
            if lk is None or getattr(lk, "_p2pz_pid", None) != os.getpid():
                lk = _LOCKS[path] = FileLock(path)
                lk._p2pz_pid = os.getpid()  # a forked child gets its own lock object
        wait = constants.lock_timeout_s() if timeout is None else timeout
        try:
            lk.acquire(timeout=wait)
        except Timeout:
            raise StoreLockedError(
                f"another process has held the lock on {self.root} for over {wait:.0f} s; "
                f"wait for it to finish, or remove {self.root / '.lock'} if no p2pz process is running"
            ) from None
        try:
            yield
        finally:
            lk.release()

    # -- transactions and recovery -------------------------------------------------------------
    def _txn_root(self) -> Path:
        return self.root / "txn"

    def _begin(self) -> Path:
        txn = self._txn_root() / f"{os.getpid()}-{uuid.uuid4().hex}"
        (txn / "items").mkdir(parents=True)
        _ACTIVE_TXNS.add(str(txn))
        return txn

    def _abort(self, txn: Path) -> None:
        shutil.rmtree(txn, ignore_errors=True)
        _ACTIVE_TXNS.discard(str(txn))

    def _commit(self, txn: Path, ops: list[dict[str, Any]]) -> None:
        """The commit point (call under the lock): write the journal, then apply it."""
        _fsync_tree(txn / "items")
        _atomic_write(txn / JOURNAL, json.dumps({"format": "p2pz-journal", "ops": ops}).encode("utf-8"))
        _fsync_dir(txn)
        self._apply(txn, ops)
        self._finish(txn)

    def _apply(self, txn: Path, ops: list[dict[str, Any]]) -> None:
        """Do a journal's renames; idempotent, so a crash at any point is finished by running it again."""
        for op in ops:
            src = txn / op["src"]
            dest = self.root / op["dest"]
            if not (src.exists() or src.is_symlink()):
                continue  # done before the crash
            if op.get("old") and (dest.exists() or dest.is_symlink()):
                old = txn / op["old"]
                if not old.exists():
                    os.rename(dest, old)
                    _fsync_dir(dest.parent)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir() and dest.is_dir():
                if any(dest.iterdir()):
                    raise IntegrityError(
                        f"{dest} exists; the transaction {txn} cannot finish it. Remove it by hand"
                    )
                dest.rmdir()
            os.replace(src, dest)
            _fsync_dir(dest.parent)

    def _finish(self, txn: Path) -> None:
        (txn / JOURNAL).unlink(missing_ok=True)
        _fsync_dir(txn)
        shutil.rmtree(txn, ignore_errors=True)
        _ACTIVE_TXNS.discard(str(txn))
        try:
            self._txn_root().rmdir()
        except OSError:
            pass

    def _recover(self) -> None:
        """Finish committed transactions, drop uncommitted ones of dead writers, remove stale temp
        files and staging folders of dead processes (call under the lock)."""
        troot = self._txn_root()
        if troot.is_dir():
            for txn in sorted(troot.iterdir()):
                if str(txn) in _ACTIVE_TXNS:
                    continue
                journal = txn / JOURNAL
                if journal.is_file():
                    try:
                        ops = strict_json(journal.read_bytes())["ops"]
                    except (OSError, JSONRefused, KeyError, TypeError):
                        ops = None  # a torn journal was never committed (it is written atomically)
                    if ops is not None:
                        self._apply(txn, ops)
                        self._finish(txn)
                        continue
                if not _owner_alive(txn.name):
                    shutil.rmtree(txn, ignore_errors=True)
        for scratch in (self.root / "tmp", self.root / "staging"):
            if scratch.is_dir():
                for child in scratch.iterdir():
                    if not _owner_alive(child.name) and str(child) not in _ACTIVE_TXNS:
                        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(
                            missing_ok=True
                        )
        for stale in self._stale_files():
            stale.unlink(missing_ok=True)

    def _stale_files(self) -> list[Path]:
        """``.<name>.<pid>.<id>.tmp`` files of dead writers beside the store's JSON files."""
        out = []
        dirs = [self.root]
        if self.packs_root.is_dir():
            dirs += [d for d in self.packs_root.iterdir() if d.is_dir()]
        for d in dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                if n.startswith(".") and n.endswith(".tmp"):
                    parts = n.split(".")
                    pid = parts[-3] if len(parts) >= 4 else ""
                    if not (pid.isdigit() and _pid_alive(int(pid))):
                        out.append(d / n)
        return out

    def _needs_recovery(self) -> bool:
        troot = self._txn_root()
        try:
            txns = [t for t in troot.iterdir() if str(t) not in _ACTIVE_TXNS]
        except OSError:
            txns = []
        if any((t / JOURNAL).exists() for t in txns):
            return True  # a committed transaction: finish it before reading
        if self._opened:
            return False
        self._opened = True
        if txns:
            return True
        for scratch in (self.root / "tmp", self.root / "staging"):
            try:
                if any(not _owner_alive(c.name) for c in scratch.iterdir()):
                    return True
            except OSError:
                pass
        return bool(self._stale_files())

    def _settle(self) -> None:
        """Crash recovery on open (and whenever a committed transaction is pending)."""
        if not self.root.is_dir() or not self._needs_recovery():
            return
        try:
            with self.lock():
                self._recover()
        except PermissionError:
            pass  # a read-only store: nothing can be finished, reads still work

    def recover(self) -> None:
        """Run crash recovery now (it also runs on the first read or write of a store)."""
        with self.lock():
            self._recover()

    # -- packs ----------------------------------------------------------------------------------
    def packs(self) -> list[PackInfo]:
        self._settle()
        if not self.packs_root.is_dir():
            return []
        out = []
        for d in sorted(self.packs_root.iterdir()):
            if d.is_dir() and not d.name.startswith("."):
                info = self._read_pack_json(d)
                out.append(PackInfo(info["name"], d, info.get("source", {})))
        return out

    def pack_names(self) -> list[str]:
        return [p.name for p in self.packs()]

    def _read_pack_json(self, d: Path) -> dict[str, Any]:
        guess = d.name.replace("--", "/", 1) if "--" in d.name else d.name
        try:
            info = strict_json(read_file_bounded(d / PACK_FILE, MAX_PACK_JSON_BYTES, ""))
        except (IntegrityError, JSONRefused):
            return {"name": guess}
        if not isinstance(info, dict):
            return {"name": guess}
        name = info.get("name")
        try:
            ok = isinstance(name, str) and naming.pack_folder(name) == d.name
        except InvalidNameError:
            ok = False
        if not ok:
            info = {**info, "name": guess}
        if not isinstance(info.get("source", {}), dict):
            info["source"] = {}
        return info

    def pack_info(self, pack: str) -> PackInfo:
        self._settle()
        d = self.pack_dir(pack)
        if not d.is_dir():
            raise NotFoundError(
                f"no pack {pack!r} in {self.packs_root}; installed: {', '.join(self.pack_names()) or 'none'}"
            )
        info = self._read_pack_json(d)
        return PackInfo(info["name"], d, info.get("source", {}))

    def set_pack_info(self, pack: str, source: dict[str, Any] | None = None) -> None:
        """Create the pack if needed and record where it came from (one transaction)."""
        with self.lock():
            self._recover()
            txn = self._begin()
            try:
                ops = self._pack_json_op(txn, pack, source, force=True)
                if ops:
                    self._commit(txn, ops)
                else:
                    self._abort(txn)
            except BaseException:
                self._abort(txn)
                raise

    def _pack_json_op(
        self, txn: Path, pack: str, source: dict[str, Any] | None, force: bool = False
    ) -> list[dict[str, Any]]:
        pj = self.pack_dir(pack) / PACK_FILE
        if source is None and pj.exists() and not force:
            return []
        if source is None and pj.exists():
            source = self._read_pack_json(self.pack_dir(pack)).get("source")
        info = {
            "name": naming.parse_pack(pack).name,
            "format_version": 1,
            "source": source if source is not None else {"type": "local"},
            "updated": now_iso(),
        }
        item = txn / "items" / PACK_FILE
        _fsync_write(item, json.dumps(info, indent=1, ensure_ascii=False).encode("utf-8"))
        return [{"src": f"items/{PACK_FILE}", "dest": str(pj.relative_to(self.root))}]

    def history(self, pack: str) -> dict[str, str]:
        """Every version the pack ever held: ``"encoder\\nname\\nversion"`` -> content hash."""
        path = self.pack_dir(pack) / HISTORY_FILE
        if not path.exists() and not path.is_dir():
            return {}
        hint = f"Remove {path} to forget the pack's version history, or remove the pack and pull it again."
        raw = read_file_bounded(path, MAX_HISTORY_BYTES, hint)
        try:
            data = strict_json(raw)
            rows = data["versions"]
            out = {}
            for enc, name, ver, chash in rows:
                if not (
                    isinstance(enc, str)
                    and isinstance(name, str)
                    and isinstance(ver, int)
                    and isinstance(chash, str)
                ):
                    raise TypeError
                out[_history_key(enc, name, ver)] = chash
            return out
        except (JSONRefused, KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{path} is corrupted: {e or 'not a version history'}. {hint}") from None

    def _history_op(self, txn: Path, pack: str, history: dict[str, str]) -> dict[str, Any]:
        rows = []
        for key, chash in sorted(history.items()):
            enc, name, ver = key.split("\n")
            rows.append([enc, name, int(ver), chash])
        item = txn / "items" / HISTORY_FILE
        _fsync_write(
            item, json.dumps({"format": "p2pz-pack-versions", "versions": rows}, ensure_ascii=False).encode()
        )
        return {
            "src": f"items/{HISTORY_FILE}",
            "dest": str((self.pack_dir(pack) / HISTORY_FILE).relative_to(self.root)),
        }

    def remove_pack(self, pack: str) -> None:
        """Remove a pack (and its version history) in one rename."""
        with self.lock():
            self._recover()
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
                name_dirs = _name_dirs(ed, name) if name else sorted(ed.iterdir())
                for nd in name_dirs:
                    if not nd.is_dir():
                        continue
                    for vd in nd.iterdir():
                        if not (vd.is_dir() and vd.name.isdigit()):
                            continue
                        try:
                            meta = read_manifest(vd)
                            if not _in_folder(meta["name"], nd.name) or (
                                meta.get("version") not in (None, int(vd.name))
                            ):
                                raise IntegrityError(
                                    f"{vd / META_FILE} is corrupted: it says {meta['name']}@{meta.get('version')} "
                                    f"but lies in {nd.name}/{vd.name}. Run `p2pz verify`, then re-import or re-pull"
                                )
                        except IntegrityError as e:
                            if not skip_damaged:
                                raise
                            warnings.warn(
                                f"skipped a damaged version: {e}", DamagedVersionWarning, stacklevel=2
                            )
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
        """Publish several concepts all or nothing: every conflict and every file is checked (with
        the reader's own validation) before anything is written, and the new versions appear
        together in one transaction, or none of them does."""
        versions = list(versions) if versions is not None else [None] * len(concepts)
        if len(versions) != len(concepts):
            raise ValueError("publish_many: give one version (or None) per concept")
        pack_name = pack_dirname(pack) and naming.parse_pack(pack).name
        with self.lock():
            self._recover()
            history = self.history(pack) if self.pack_dir(pack).is_dir() else {}
            plans: list[tuple[Path | None, Concept, tuple[bytes, bytes] | None]] = []
            taken: dict[tuple[str, str], set[int]] = {}
            for concept, ver in zip(concepts, versions, strict=True):
                name = naming.normalize_concept(concept.name)
                chash = concept_content_hash(concept.with_(name=name))
                existing = (
                    {e.version: e for e in self.entries(pack=pack, encoder=concept.encoder.id, name=name)}
                    if self.pack_dir(pack).is_dir()
                    else {}
                )
                past = {
                    int(k.rsplit("\n", 1)[1]): h
                    for k, h in history.items()
                    if k.startswith(f"{concept.encoder.id}\n{name}\n")
                }
                want = ver if ver is not None else concept.version
                same = [e for e in existing.values() if e.content_hash == chash]
                if want is None and same:
                    plans.append((None, self.load(max(same, key=lambda e: e.version)), None))
                    continue
                if want is not None and want in existing:
                    if existing[want].content_hash == chash:
                        plans.append((None, self.load(existing[want]), None))
                        continue
                    raise ImmutableVersionError(
                        f"{pack}:{name}@{want} for {concept.encoder.id} already exists with other content "
                        f"(content hash {existing[want].content_hash[:12]}..., yours {chash[:12]}...). Versions never "
                        f"change: publish without a version to get @{max(existing) + 1}, or use another pack."
                    )
                if want is not None and want in past and past[want] != chash:
                    raise ImmutableVersionError(
                        f"{pack}:{name}@{want} for {concept.encoder.id} was published before with other content "
                        f"(content hash {past[want][:12]}..., yours {chash[:12]}...); a version number is never reused. "
                        "Publish without a version to get the next number."
                    )
                key = (concept.encoder.id, name)
                used = set(existing) | set(past) | taken.setdefault(key, set())
                if want is None:
                    want = max(used, default=0) + 1
                elif want in used and want not in past:
                    raise ImmutableVersionError(f"{name}@{want} appears twice in one publish")
                taken[key].add(want)
                final = concept.with_(
                    name=name, version=int(want), created=concept.created or now_iso(), pack=pack_name
                )
                dest = self.version_dir(pack, concept.encoder.id, name, want)
                data, meta, meta_bytes = prepare_concept(final, dest)  # the reader's checks, before any write
                plans.append((dest, final.with_(content_hash=meta["content_hash"]), (data, meta_bytes)))
            new = [(dest, final, files) for dest, final, files in plans if dest is not None]
            if new or source is not None:
                txn = self._begin()
                try:
                    ops = []
                    for i, (dest, final, files) in enumerate(new):
                        item = txn / "items" / str(i)
                        item.mkdir()
                        _fsync_write(item / TENSOR_FILE, files[0])
                        _fsync_write(item / META_FILE, files[1])
                        ops.append({"src": f"items/{i}", "dest": str(dest.relative_to(self.root))})
                        history[_history_key(final.encoder.id, final.name, final.version)] = (
                            final.content_hash
                        )
                    ops += self._pack_json_op(txn, pack, source)
                    if new:
                        ops.append(self._history_op(txn, pack, history))
                    self._commit(txn, ops)
                except BaseException:
                    if (txn / JOURNAL).exists():
                        _ACTIVE_TXNS.discard(str(txn))  # committed: the next open finishes it
                    else:
                        self._abort(txn)
                    raise
            return [final for _, final, _ in plans]

    @contextmanager
    def stage_pack(self) -> Iterator[Path]:
        """A fresh, empty pack folder inside a new transaction, for a pull to download into
        (``txn/<pid>-<id>/items/pack``); pass it to `install_pack`. Leaving the block without a
        commit removes it and everything in it, and so does crash recovery after a ``kill -9``.

        >>> with store.stage_pack() as staged:                                   # doctest: +SKIP
        ...     hf_hub_download(repo_id, path, repo_type="dataset", local_dir=staged)
        ...     store.install_pack("alice/pack", staged, versions, source)
        """
        txn = self._begin()
        staged = txn / "items" / "pack"
        staged.mkdir()
        try:
            yield staged
        finally:
            if (txn / JOURNAL).exists():
                _ACTIVE_TXNS.discard(str(txn))  # committed: the next open finishes it
            else:
                self._abort(txn)

    def install_pack(
        self,
        pack: str,
        staged_pack: Path,
        versions: Sequence[StagedVersion],
        source: dict[str, Any],
        *,
        force: bool = False,
        extra: Callable[[Path, Path], None] | None = None,
    ) -> tuple[list[str], list[str]]:
        """Replace pack ``pack`` by the staged pack folder ``staged_pack`` (from `stage_pack`, holding
        exactly ``versions`` of a pulled revision at their Hub paths) in one transaction.

        ``extra(staged_pack, installed_pack)``, when given, is called under the lock just before the
        commit to add more files to the staged pack folder (the installed pack's own evaluation
        records); they are swapped in with the rest, or not at all.

        Every staged version is read back (every hash) and then the folder is swapped in by the
        transaction's journal: a crash at any point leaves the old pack or the new one, never
        neither. The staged files are renamed, never copied. Refused without ``force``: a pack that
        did not come from this Hub repo (`PackClashError`), and other content under a version this
        pack ever held (`ImmutableVersionError`), even one a later revision removed. Returns (added,
        removed) as ``name@version`` lists.
        """
        dest = self.pack_dir(pack)
        txn = staged_pack.parent.parent
        if staged_pack.name != "pack" or txn.parent != self._txn_root() or str(txn) not in _ACTIVE_TXNS:
            raise ValueError(f"install_pack: {staged_pack} is not a folder from this store's stage_pack()")
        try:
            staged: dict[tuple[str, str, int], str] = {}
            for v in versions:
                vd = staged_pack / concept_dir(v.encoder_id, v.name, v.version)
                c = read_concept_dir(vd, hint="The pack on the Hub is damaged; tell its owner.")
                if (c.name, c.version, c.encoder.id) != (v.name, v.version, v.encoder_id):
                    raise IntegrityError(
                        f"{pack}: {v.name}@{v.version} ({v.encoder_id}) says {c.ref} ({c.encoder.id})"
                    )
                staged[(v.encoder_id, v.name, v.version)] = c.content_hash
            _fsync_files(staged_pack)  # downloaded files are renamed into place, so make them durable first
            with self.lock():
                self._recover()
                old: dict[tuple[str, str, int], str] = {}
                history: dict[str, str] = {}
                if dest.is_dir():
                    info = self._read_pack_json(dest)
                    src = info.get("source") or {}
                    same_repo = (
                        src.get("type") == "hub"
                        and str(src.get("repo_id", "")).lower() == str(source.get("repo_id", "")).lower()
                    )
                    if not same_repo and not force:
                        raise PackClashError(
                            f"{dest} holds a pack that did not come from the Hub repo {source.get('repo_id')} "
                            f"(its source: {src.get('type', 'unknown')}); nothing was changed. Rename or remove it "
                            f"(`LocalStore.remove_pack({info['name']!r})`), or replace it with `--force`"
                        )
                    old = {
                        (e.encoder.id, e.name, e.version): e.content_hash
                        for e in self.entries(pack=pack, skip_damaged=True)
                    }
                    try:
                        history = self.history(pack)
                    except IntegrityError:
                        if not force:
                            raise
                known = {**{_history_key(*k): h for k, h in old.items()}, **history}
                changed = [k for k, h in staged.items() if known.get(_history_key(*k), h) != h]
                if changed and not force:
                    shown = ", ".join(f"{n}@{v} ({enc})" for enc, n, v in changed[:5])
                    raise ImmutableVersionError(
                        f"{pack}: the Hub now has other content under versions this store installed before ({shown}); "
                        "the repo's history was rewritten. Nothing was changed. Keep your copy, or replace it with "
                        f"`p2pz pull {pack} --force` (hub.pull(..., force=True))"
                    )
                for k, h in staged.items():
                    known[_history_key(*k)] = h
                if extra is not None:
                    extra(staged_pack, dest)
                history_item = self._history_op(txn, pack, known)
                os.replace(txn / history_item["src"], staged_pack / HISTORY_FILE)
                info = {
                    "name": naming.parse_pack(pack).name,
                    "format_version": 1,
                    "source": source,
                    "updated": now_iso(),
                }
                _fsync_write(
                    staged_pack / PACK_FILE, json.dumps(info, indent=1, ensure_ascii=False).encode("utf-8")
                )
                op = {"src": "items/pack", "dest": str(dest.relative_to(self.root)), "old": "old"}
                self._commit(txn, [op])
        except BaseException:
            if (txn / JOURNAL).exists():
                _ACTIVE_TXNS.discard(str(txn))  # committed: the next open finishes it
            raise
        added = [f"{n}@{v}" for (enc, n, v) in sorted(staged) if (enc, n, v) not in old]
        removed = [f"{n}@{v}" for (enc, n, v) in sorted(old) if (enc, n, v) not in staged]
        return added, removed

    # -- checking -------------------------------------------------------------------------------
    def verify(self, pack: str | None = None) -> tuple[int, list[Problem]]:
        """Check every stored version (schema and hashes). Returns (versions checked, problems).

        Any damage is a `Problem` (never an exception): a folder where a file should be, bad JSON,
        a hash mismatch, a version in the wrong folder, an unreadable version history.
        """
        problems: list[Problem] = []
        n = 0
        packs = [self.pack_info(pack)] if pack else self.packs()
        for p in packs:
            try:
                self.history(p.name)
            except (IntegrityError, InvalidNameError) as e:
                problems.append(Problem(p.path / HISTORY_FILE, str(e)))
            pj = p.path / PACK_FILE
            if pj.exists() or pj.is_dir():
                try:
                    info = strict_json(read_file_bounded(pj, MAX_PACK_JSON_BYTES, ""))
                    if not isinstance(info, dict) or not isinstance(info.get("source", {}), dict):
                        raise JSONRefused("not a pack description")
                except (IntegrityError, JSONRefused) as e:
                    problems.append(Problem(pj, f"{pj} is corrupted: {e}"))
            croot = p.path / "concepts"
            if not croot.is_dir():
                continue
            vdirs = sorted(
                {m.parent for m in croot.glob(f"*/*/*/{META_FILE}")}
                | {t.parent for t in croot.glob(f"*/*/*/{TENSOR_FILE}")}
            )
            for vd in vdirs:
                n += 1
                try:
                    c = read_concept_dir(vd, pack=p.name)
                    if str(c.version) != vd.name or not _in_folder(c.name, vd.parent.name):
                        raise IntegrityError(
                            f"{vd / META_FILE}: says {c.name}@{c.version}, lies in {vd.parent.name}/{vd.name}"
                        )
                except (P2PZError, OSError, ValueError, RecursionError) as e:
                    problems.append(Problem(vd, str(e) or e.__class__.__name__))
        return n, problems

    def verify_or_raise(self, pack: str | None = None) -> int:
        """`verify`, raising `IntegrityError` (exit code 1 in the CLI) when anything is damaged."""
        n, problems = self.verify(pack)
        if problems:
            raise IntegrityError(
                f"{len(problems)} of {n} concept versions in {self.root} are damaged: "
                + "; ".join(f"{p.path}: {p.message}" for p in problems[:5])
            )
        return n


class DamagedVersionWarning(UserWarning):
    """A listing skipped a damaged stored version (`p2pz verify` lists them all)."""


def _in_folder(name: str, folder: str) -> bool:
    """Does a concept named ``name`` belong in ``folder``: its Hub path component, or (a store written
    before the one layout) the raw name?"""
    return folder == name_component(name) or folder == name


def _name_dirs(encoder_dir: Path, name: str) -> list[Path]:
    try:
        comp = name_component(name)
    except (InvalidNameError, ValueError):
        comp = name
    return [encoder_dir / comp] + ([encoder_dir / name] if name != comp else [])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _owner_alive(folder_name: str) -> bool:
    """Is the process that named a folder ``<pid>-...`` still running (ours counts as running)?"""
    pid = folder_name.split("-", 1)[0]
    if not pid.isdigit():
        return False
    return int(pid) == os.getpid() or _pid_alive(int(pid))


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


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_files(root: Path) -> None:
    for d, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(d) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_tree(root: Path) -> None:
    for d, _dirs, _files in os.walk(root):
        _fsync_dir(Path(d))


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside ``path``, fsync, then rename over it (`atomic.write_bytes`)."""
    write_bytes(path, data)


_DEFAULT: dict[str, LocalStore] = {}


def default_store() -> LocalStore:
    """The store at `default_root()` (re-read from the environment on each call)."""
    root = default_root()
    key = str(root)
    if key not in _DEFAULT:
        _DEFAULT[key] = LocalStore(root)
    return _DEFAULT[key]
