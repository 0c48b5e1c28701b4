"""The committed dashboard bundle and the sources it was built from.

`make dashboard` builds `server/dashboard/` (React, typed from `protos/`) into
`web/dist/` and then runs ``python -m sira_server.dashboard_bundle`` to record
`SOURCE_HASH`, the sha256 of every source file. The drift test recomputes it: a
change to the dashboard or the protos without a rebuild fails the suite, the way
the stubs test catches protos changed without `make protos`. Nothing here needs Node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO_ROOT / "server" / "dashboard"
PROTO_DIR = REPO_ROOT / "protos"
DIST_DIR = Path(__file__).resolve().parent / "web" / "dist"
HASH_FILE = DIST_DIR / "SOURCE_HASH"

_SKIPPED_DIRS = frozenset({"node_modules", ".vite", "dist"})


def source_files() -> Iterator[Path]:
    """Every file the bundle is built from, in a stable order."""
    for root in (DASHBOARD_DIR, PROTO_DIR):
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and not _SKIPPED_DIRS.intersection(relative.parts):
                yield path


def source_hash() -> str:
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def main() -> None:
    HASH_FILE.write_text(source_hash() + "\n")
    print(f"{HASH_FILE.relative_to(REPO_ROOT)}: {HASH_FILE.read_text().strip()}")


if __name__ == "__main__":
    main()
