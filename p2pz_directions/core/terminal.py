"""Printing untrusted text (captions, names, descriptions from pulled packs) on a terminal.

`safe_text` makes a string inert for a terminal and for rich: control characters (ANSI escape
sequences, the terminal-title OSC, clear-screen, carriage returns, C1 controls), Unicode bidi
overrides and line separators are shown as Python escapes (``\\x1b``, ``\\u202e``), and rich
markup (``[bold]``, ``[/]``, ``[link=...]``) is escaped so it prints literally and never raises
`rich.errors.MarkupError`. ``--json`` output never goes through it: JSON stays exact.

>>> safe_text("\\x1b]0;pwned\\x07a [bold]cat[/bold]")
'\\\\x1b]0;pwned\\\\x07a \\\\[bold]cat\\\\[/bold]'
>>> safe_text("a [red]dog", markup=False)
'a [red]dog'
"""

from __future__ import annotations

import unicodedata

from rich.markup import escape

#: format characters kept as they are (joiners inside emoji and scripts)
_KEEP_CF = {"\u200c", "\u200d"}


def _inert(ch: str) -> bool:
    cat = unicodedata.category(ch)
    if cat in ("Cc", "Zl", "Zp", "Cs"):
        return False
    return not (cat == "Cf" and ch not in _KEEP_CF)


def safe_text(s: object, *, markup: bool = True) -> str:
    """``s`` as text that cannot drive the terminal: control and bidi characters escaped, and
    (unless ``markup=False``, for output printed with rich markup off) rich markup escaped."""
    text = s if isinstance(s, str) else str(s)
    if not all(_inert(ch) for ch in text):
        text = "".join(
            ch if _inert(ch) else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
            for ch in text
        )
    return escape(text) if markup else text
