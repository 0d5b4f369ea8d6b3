"""Package version and the code fingerprint that keys stored results.

Results in a sweep database are keyed by :func:`code_version`, the release
number plus a hash of the package's Python sources, so that a changed numerics
module never silently reuses results computed by older code (resuming a sweep
with unchanged code still skips everything already finished).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``"<version>+<12 hex digits>"``: sha256 over the sorted relative paths and bytes of hdlora/*.py."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
