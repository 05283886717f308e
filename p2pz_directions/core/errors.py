"""Exceptions raised by p2pz-directions.

Every error says what is wrong and what to do next. Those that callers may want to catch by
kind also derive from the matching built-in (`ValueError`, `LookupError`, `OSError`), so plain
``except ValueError`` keeps working.
"""

from __future__ import annotations


class P2PZError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidNameError(P2PZError, ValueError):
    """A concept, direction or pack name is malformed."""


class NotFoundError(P2PZError, LookupError):
    """A name was well formed but nothing in the registry matches it."""

    def __init__(self, message: str, suggestions: list[str] | None = None):
        super().__init__(message)
        self.suggestions = list(suggestions or [])


class AmbiguousNameError(P2PZError, LookupError):
    """Several packs or encoders hold the name and none was chosen."""

    def __init__(self, message: str, candidates: list[str] | None = None):
        super().__init__(message)
        self.candidates = list(candidates or [])


class EncoderMismatchError(P2PZError, ValueError):
    """Embeddings of two different text encoders met (or a direction met the wrong model)."""


class IntegrityError(P2PZError, OSError):
    """A stored file is corrupted, truncated, or does not match its recorded hash."""


class ImmutableVersionError(P2PZError, ValueError):
    """Other content was published under a version that already exists."""


class FormatError(P2PZError, ValueError):
    """A manifest, tensor file or legacy file is not of the expected form."""


class UnsafeFileError(P2PZError, ValueError):
    """A legacy pickle tried to do more than hold tensors; it was refused."""


class StoreLockedError(P2PZError, TimeoutError):
    """Another process held the store's lock for too long."""


class ConceptNotForEncoderError(EncoderMismatchError, NotFoundError):
    """A concept named for a model exists, but only for other text encoders (both a mismatch and a miss)."""
