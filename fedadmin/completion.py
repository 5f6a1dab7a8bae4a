"""Shell completion of TARGET arguments: server, client, all and the site names the last `status` saw with this
admin kit, kept in the console's state folder; completing never connects to anything."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

from fedcommon.commands import TARGET_RE

STATE_ENV = "FEDADMIN_STATE_DIR"
KEYWORDS = ("server", "client", "all")
MAX_SITES = 10_000
MAX_CACHE_BYTES = 1 << 20


def state_dir() -> Path:
    """The console's own state: $FEDADMIN_STATE_DIR, else $XDG_STATE_HOME/fedadmin, else ~/.local/state/fedadmin."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "fedadmin"


def sites_file(kit: Path) -> Path:
    """Where the site names seen with `kit` are kept (one file per admin kit, as each kit is one federation)."""
    import zlib  # a name for the file, not a secret: crc32 costs `status` no import of OpenSSL's hashes

    digest = f"{zlib.crc32(str(Path(kit).resolve()).encode()):08x}"
    return state_dir() / f"sites-{digest}.json"


def remember_sites(kit: Path | None, sites: Iterable[str]) -> None:
    """Keep the site names a `status` reply named; a state folder that cannot be written costs completion only."""
    if kit is None:
        return
    names = sorted({s for s in sites if s not in KEYWORDS and TARGET_RE.fullmatch(s)})[:MAX_SITES]
    if cached_sites(kit) == names:
        return  # the usual case: nothing to write (and `status` pays for no atomic write's imports)
    from fedcommon.atomic import atomic_write_json

    try:
        state_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(sites_file(kit), {"kit": str(Path(kit).resolve()), "sites": names})
    except OSError:
        pass


def cached_sites(kit: Path | str | None) -> list[str]:
    """The site names kept for `kit`; none when there are none or the file is not what remember_sites wrote."""
    if not kit:
        return []
    try:
        with open(sites_file(Path(kit)), "rb") as f:
            data = json.loads(f.read(MAX_CACHE_BYTES + 1)[:MAX_CACHE_BYTES])
    except (OSError, ValueError):
        return []
    sites = data.get("sites") if isinstance(data, dict) else None
    if not isinstance(sites, list):
        return []
    return [s for s in sites[:MAX_SITES] if isinstance(s, str) and TARGET_RE.fullmatch(s)]


def complete_targets(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Click's shell_complete for TARGET...: the keywords and the kit's cached site names not given yet."""
    from click.shell_completion import CompletionItem

    kit = ctx.find_root().params.get("kit") or os.environ.get("FEDADMIN_KIT")
    given = set(ctx.params.get(param.name or "") or ())
    words = [*KEYWORDS, *cached_sites(kit)]
    return [CompletionItem(w) for w in words if w.startswith(incomplete) and w not in given]
