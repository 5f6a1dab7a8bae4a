"""The one place that makes remote text safe for a terminal or a log: control characters become visible escapes.

A site's metric name, error text or shell output, an admin's command or target name: any of it may carry ESC
sequences (a terminal's title, its clipboard through OSC 52, a cleared screen), a carriage return that hides
what came before, or a newline that starts a forged log record. What reaches a terminal or a log goes through
here first.
"""

from __future__ import annotations

import re

# C0 controls (but tab and newline), DEL, C1 controls, and the Unicode line separators and bidirectional
# overrides that reorder or break what a reader sees.
_TERMINAL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# A log line holds one record: newlines and tabs are escaped as well.
_LOG = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _shown(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def for_terminal(text: str) -> str:
    """`text` with every control character but newline and tab shown as an escape (\\x1b, \\r, \\u202e)."""
    return _TERMINAL.sub(_shown, text)


def for_log(text: str) -> str:
    """`text` on one line: newlines, tabs and every other control character shown as escapes."""
    return _LOG.sub(_shown, text)
