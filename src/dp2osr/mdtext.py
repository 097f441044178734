"""Escaping of untrusted text (image, folder and model names) for the Markdown files dp2osr writes.

A name is shown as literal text: ``&``, ``<`` and ``>`` become HTML entities (no raw HTML, no autolinks),
the characters that start Markdown emphasis, code, links, strikethrough or a table cell break
(``\\ ` * _ [ ] ~ |``) are backslash-escaped, and line breaks become spaces (a table row is one line).
"""

from __future__ import annotations

_ENTITIES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"))
_BACKSLASHED = "\\`*_[]~|"


def md_escape(text: object) -> str:
    """``text`` as literal Markdown (safe inside a table cell or a list item)."""
    s = " ".join(str(text).splitlines())
    s = "".join("\\" + c if c in _BACKSLASHED else c for c in s)
    for raw, entity in _ENTITIES:
        s = s.replace(raw, entity)
    return s
