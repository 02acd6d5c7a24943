"""Text that came from a file someone else wrote, made safe to print on a terminal.

A share's class names, description, citation and provenance are chosen by the sending site. On a
terminal an ESC starts a control sequence (clear the screen, retitle the window, move the cursor),
a CR overwrites the line, and Unicode's bidirectional controls reorder what is shown ("Trojan
Source", Boucher and Anderson 2021). :func:`printable` shows each such character as an escape
instead, so what is printed is what is stored.
"""
from __future__ import annotations

import re

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # every log line, in the command and in its worker processes

# Bidirectional embeddings, overrides and isolates, and the marks; Unicode's line and paragraph
# separators. The C0/C1 controls and DEL are found by category (Cc).
_INVISIBLE = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f" + _INVISIBLE + "]")


def _escape(m: re.Match) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``str(text)`` with every control character (newlines included) and bidi control written as an escape."""
    return _UNSAFE.sub(_escape, str(text))


def printable_lines(text: object) -> str:
    """:func:`printable` line by line: the line breaks stay, anything else is escaped."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def control_characters(text: str, allow: str = "") -> list[str]:
    """The distinct unsafe characters in ``text`` (except those in ``allow``), as escapes, in order of appearance."""
    seen: list[str] = []
    for ch in text:
        if ch not in allow and _UNSAFE.match(ch) and printable(ch) not in seen:
            seen.append(printable(ch))
    return seen

