"""Lean model classes (no diffusers/transformers import)."""

from __future__ import annotations


class LeanUnsupported(Exception):
    """A model folder or config the lean classes do not handle: the caller loads diffusers' or
    transformers' class instead."""
