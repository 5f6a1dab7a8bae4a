"""The operator's console for a federation (`fedadmin`); it never imports numpy or torch.

`from fedadmin import Session` is the Python API (fedadmin.session), imported only when named.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Session"]


def __getattr__(name: str) -> Any:
    if name == "Session":
        from fedadmin.session import Session

        return Session
    raise AttributeError(f"module 'fedadmin' has no attribute {name!r}")
