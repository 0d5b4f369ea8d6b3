"""hdlora.theory.heap: the heap settings are applied once per process, only on glibc, and can be switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hdlora.theory import heap

_PROBE = (
    "import json, resource\n"
    "import numpy as np\n"
    "from hdlora.theory import heap\n"
    "ok = heap.keep_freed_memory()\n"
    "faults = []\n"
    "for _ in range(3):\n"
    "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "    for _ in range(5):\n"
    "        a = [np.ones((30000, 6, 6)) for _ in range(4)]; del a\n"  # 4 x 8.6 MB, as the pre-training Hessians
    "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n"
    "print(json.dumps({'applied': ok, 'again': heap.keep_freed_memory(), 'faults': faults}))\n"
)


def _probe(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("HDLORA_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["HDLORA_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def _glibc() -> bool:
    import ctypes

    try:
        return sys.platform.startswith("linux") and bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="the settings exist on glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    kept = _probe(None)
    default = _probe("0")
    assert kept["applied"] and kept["again"]
    assert not default["applied"]
    # 5 x 4 blocks of 8.6 MB (2100 pages each): with the settings the heap keeps them after the first round
    assert kept["faults"][1] < 200 and kept["faults"][2] < 200, kept
    # glibc's defaults return the freed top of the heap (34 MB > twice the largest block) every round, and each
    # round takes its pages again (the state evolution's page faults, see the module docstring)
    assert default["faults"][2] > 5000, default


def test_not_applied_twice_in_process():
    first = heap.keep_freed_memory()
    assert heap.keep_freed_memory() is first
