"""The one parser for concept, direction and pack names.

Grammar (whitespace around the separators and the case of concept names do not matter)::

    name      := [pack ":"] side "->" side [ "@" version ]      a direction
               | [pack ":"] concept ["@" version]               a concept
    side      := concept ["@" (version | "latest")]
    pack      := local-pack | owner "/" repo ["@" revision]     revision: a tag, branch or commit
    version   := positive integer

Versions: ``cat@2->dog`` pins the source only; ``cat->dog@2`` pins the *pair* (both concepts at
version 2) unless the source carries its own version, in which case ``@2`` belongs to the target
alone. ``cat@latest->dog@2`` pins only the target.

Concept names are normalised: NFC, stripped, inner whitespace collapsed to one space, case-folded
(``"Cat  Wearing a Hat"`` -> ``"cat wearing a hat"``), so two names that differ only in case are
one name, also on case-insensitive file systems. A concept name is a folder name in the store: at
most 200 characters *and* at most `MAX_NAME_BYTES` bytes in UTF-8 (file systems allow 255).

One namespace for packs: a local pack name never contains ``--`` (nor does a Hub owner or repo
name, as on the Hub), so a Hub pack ``alice/pack`` (folder ``alice--pack``) can never share a
folder with a local pack. Pack folders are lower-case: Hub ids that differ only in case are one
pack locally.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from p2pz_directions.core.errors import InvalidNameError

MAX_NAME_LENGTH = 200
#: bytes of a concept name in UTF-8: a folder name, under the 255-byte limit of common file systems
MAX_NAME_BYTES = 200
ARROW = "->"
_WS = re.compile(r"\s+")
_LOCAL_PACK = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,94}[a-z0-9])?$")
_HUB_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
_RESERVED_CHARS = set(":@/\\")


@dataclass(frozen=True)
class ConceptRef:
    """A concept name with an optional pinned version (``None`` means the latest)."""

    name: str
    version: int | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class PackRef:
    """A local pack name (``pix2pix-zero``) or a Hub repo id (``someone/pack``) with a revision."""

    name: str
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return "/" in self.name

    def __str__(self) -> str:
        return self.name if self.revision is None else f"{self.name}@{self.revision}"


@dataclass(frozen=True)
class DirectionRef:
    """A parsed direction name: ``[pack:]source->target``."""

    source: ConceptRef
    target: ConceptRef
    pack: PackRef | None = None

    def __str__(self) -> str:
        prefix = f"{self.pack}:" if self.pack else ""
        src, tgt = self.source, self.target
        if src.version is not None and src.version == tgt.version:
            return f"{prefix}{src.name}->{tgt.name}@{tgt.version}"
        if src.version is None and tgt.version is not None:
            return f"{prefix}{src.name}@latest->{tgt}"
        return f"{prefix}{src}->{tgt}"


def normalize_concept(name: str) -> str:
    """Validate and normalise one concept name; raise `InvalidNameError` (a ValueError) if bad."""
    if not isinstance(name, str):
        raise InvalidNameError(f"a concept name must be a string, not {type(name).__name__}")
    norm = _WS.sub(" ", unicodedata.normalize("NFC", name)).strip()
    norm = unicodedata.normalize("NFC", norm.casefold())
    if not norm:
        raise InvalidNameError(
            "a concept name is empty: write something on both sides of '->', e.g. 'cat->dog'"
        )
    if len(norm) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"concept name is {len(norm)} characters long; the limit is {MAX_NAME_LENGTH}")
    try:
        nbytes = len(norm.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidNameError(f"concept name {name!r} contains a lone surrogate; remove it") from None
    if nbytes > MAX_NAME_BYTES:
        raise InvalidNameError(
            f"concept name is {nbytes} bytes long in UTF-8; the limit is {MAX_NAME_BYTES} bytes (it is a folder "
            "name in the store): shorten it"
        )
    for ch in norm:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise InvalidNameError(f"concept name {name!r} contains a control character ({ch!r}); remove it")
    bad = sorted(_RESERVED_CHARS.intersection(norm))
    if bad:
        raise InvalidNameError(
            f"concept name {norm!r} contains {' '.join(repr(c) for c in bad)}: '/', '\\\\', ':' and '@' are "
            "reserved (':' ends a pack prefix, '@' starts a version)"
        )
    if ".." in norm:
        raise InvalidNameError(f"concept name {norm!r} contains '..'; concept names cannot look like paths")
    if norm.startswith(".") or norm.startswith("-") or norm.endswith("-"):
        raise InvalidNameError(f"concept name {norm!r} cannot start with '.' or '-', nor end with '-'")
    if ARROW in norm or "<-" in norm:
        raise InvalidNameError(f"{norm!r} is a direction, not a concept name")
    return norm


def _parse_version(text: str, where: str) -> int | None:
    text = text.strip().lower()
    if text == "latest":
        return None
    if not text.isdigit() or int(text) < 1 or len(text) > 9:
        raise InvalidNameError(
            f"version {text!r} in {where!r} is not a positive integer (write e.g. '@2' or '@latest')"
        )
    return int(text)


def _split_version(side: str, where: str) -> tuple[str, int | None, bool]:
    """Split ``concept[@version]``; the flag says whether a version was written at all."""
    if side.count("@") > 1:
        raise InvalidNameError(f"{where!r}: more than one '@' in {side.strip()!r}")
    if "@" in side:
        name, ver = side.split("@")
        return name, _parse_version(ver, where), True
    return side, None, False


def pack_folder(pack: PackRef | str) -> str:
    """The store folder of a pack: ``alice/pack`` -> ``alice--pack`` (lower-case), a local name as is.

    Injective on valid names: no valid local name contains ``--`` and no Hub id part does.
    """
    ref = parse_pack(pack) if isinstance(pack, str) else pack
    return ref.name.replace("/", "--").lower()


def parse_pack(text: str) -> PackRef:
    """Parse ``name`` or ``owner/repo[@revision]``."""
    raw = text.strip()
    if not raw:
        raise InvalidNameError("the pack prefix is empty: write 'pack:cat->dog' or leave the prefix out")
    revision = None
    if "@" in raw:
        raw, revision = raw.split("@", 1)
        raw, revision = raw.strip(), revision.strip()
        if not _REVISION.match(revision) or ".." in revision:
            raise InvalidNameError(f"pack revision {revision!r} is not a valid tag, branch or commit")
    if "/" in raw:
        parts = raw.split("/")
        if len(parts) != 2 or not all(_HUB_PART.match(p) for p in parts) or ".." in raw:
            raise InvalidNameError(f"pack {raw!r} is not a Hub repo id of the form 'owner/name'")
        if "--" in raw:
            raise InvalidNameError(
                f"pack {raw!r}: '--' is not allowed in a Hub repo id (the Hub forbids it too)"
            )
        return PackRef(raw, revision)
    if revision is not None:
        raise InvalidNameError(f"pack {raw!r}@{revision}: only Hub packs ('owner/name@rev') take a revision")
    low = raw.lower()
    if not _LOCAL_PACK.match(low) or ".." in low:
        raise InvalidNameError(
            f"pack name {raw!r} is invalid: use lower-case letters, digits, '.', '_' and '-' (at most 96)"
        )
    if "--" in low:
        raise InvalidNameError(
            f"pack name {raw!r} contains '--', which is reserved: '{low.replace('--', '/', 1)}' would be a Hub "
            f"pack in the same folder. Use a single '-' (e.g. {low.replace('--', '-')!r})"
        )
    return PackRef(low, None)


def _check_whole(text: str) -> str:
    if not isinstance(text, str):
        raise InvalidNameError(f"a name must be a string, not {type(text).__name__}")
    if len(text) > 2 * MAX_NAME_LENGTH + 200:
        raise InvalidNameError(f"name is {len(text)} characters long; far over the limit")
    for ch in text:
        if ch not in " \t" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            raise InvalidNameError(f"name {text!r} contains a control character ({ch!r}); remove it")
    return text


def _split_pack(text: str) -> tuple[PackRef | None, str]:
    if ":" not in text:
        return None, text
    pack, rest = text.split(":", 1)
    if ":" in rest:
        raise InvalidNameError(f"{text!r} has more than one ':'; write '[pack:]source->target'")
    return parse_pack(pack), rest


def parse_direction(text: str) -> DirectionRef:
    """Parse a direction name such as ``"Cat -> Dog"`` or ``"pix2pix-zero:cat@1->dog@2"``."""
    _check_whole(text)
    pack, body = _split_pack(text)
    if body.count(ARROW) != 1:
        if ARROW not in body:
            raise InvalidNameError(f"{text!r} is not a direction: write 'source->target', e.g. 'cat->dog'")
        raise InvalidNameError(f"{text!r} has more than one '->'; a direction has exactly two sides")
    left, right = body.split(ARROW)
    src_name, src_ver, src_pinned = _split_version(left, text)
    tgt_name, tgt_ver, _ = _split_version(right, text)
    if not src_pinned and tgt_ver is not None:
        src_ver = tgt_ver  # one version for the pair
    source = ConceptRef(normalize_concept(src_name), src_ver)
    target = ConceptRef(normalize_concept(tgt_name), tgt_ver)
    if source.name == target.name:
        raise InvalidNameError(
            f"{text!r} has the same concept {source.name!r} on both sides; a direction needs two concepts"
        )
    return DirectionRef(source, target, pack)


def parse_concept(text: str) -> tuple[PackRef | None, ConceptRef]:
    """Parse a concept name such as ``"cat"``, ``"cat@2"`` or ``"pix2pix-zero:cat"``."""
    _check_whole(text)
    pack, body = _split_pack(text)
    name, ver, _ = _split_version(body, text)
    return pack, ConceptRef(normalize_concept(name), ver)


def is_direction(text: str) -> bool:
    """True if ``text`` is written as a direction (contains ``->``)."""
    return isinstance(text, str) and ARROW in text


def slug(encoder_id: str) -> str:
    """A file-system-safe folder name for an encoder id (``openai/clip-vit-large-patch14`` ->
    ``openai--clip-vit-large-patch14``), as huggingface_hub names its cache folders."""
    out = encoder_id.replace("/", "--").replace("\\", "--").replace(":", "--")
    out = re.sub(r"[^A-Za-z0-9._-]", "_", out)
    if not out or out in (".", "..") or out.startswith(".") or len(out) > 200:
        raise InvalidNameError(f"encoder id {encoder_id!r} cannot be used as a folder name")
    return out
