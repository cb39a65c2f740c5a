"""Values from clients in log lines: escaped, so that a request id or session id cannot start a forged
log line (a newline) or drive a terminal (control characters), and bounded in length."""

from __future__ import annotations

MAX_LOGGED_CHARS = 160


def escaped(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """``value`` as one printable line: backslash, control and other non-printable characters
    (newlines, escape sequences, Unicode line separators) written as Python escapes (``\\n``,
    ``\\x1b``, ``\\u2028``), cut at ``limit`` characters with '...'."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    if text.isprintable() and "\\" not in text:
        out = text
    else:
        out = "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text)
    return out + "..." if cut else out


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    # repr's escapes (\n, \t, \x1b, \u2028, ...) without its quotes.
    return repr(char)[1:-1]
