"""Package version and the code fingerprint that keys stored results.

Results in a sweep database are keyed by :func:`code_version`, the release
number plus a hash of the *numerics* sources (the model, the simulator and the
theory: ``params.py``, ``activations.py``, ``data.py``, ``simulate/``,
``theory/``), so that a changed numerics module never silently reuses results
computed by older code, while edits to plotting, the CLI or the sweep machinery
(``experiments/``, ``cli.py``) keep stored results valid.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"

#: What the code fingerprint covers (relative to the package root); CLI modules are left out.
NUMERICS_FILES = ("params.py", "activations.py", "data.py")
NUMERICS_PACKAGES = ("simulate", "theory")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``"<version>+<12 hex digits>"``: sha256 over the relative paths and bytes of the numerics sources."""
    root = Path(__file__).resolve().parent
    files = [root / name for name in NUMERICS_FILES]
    for sub in NUMERICS_PACKAGES:
        files += list((root / sub).rglob("*.py"))
    h = hashlib.sha256()
    for path in sorted(p for p in files if not p.name.startswith("cli")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
