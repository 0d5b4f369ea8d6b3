"""Benchmark of the command line's start-up: process wall time, old code against new, in ONE run; prints JSON.

Cases (each a fresh ``python -m hdlora.cli ...`` process, as a user's ``hdlora ...``):

* ``help``: ``hdlora --help``;
* ``theory_help``: ``hdlora theory --help``;
* ``linear_point``: ``hdlora theory --activation linear --alpha 0.1 --alpha-ft 3 --tokens 3 --noise 0.5
  --lam 0.1 --lam-ft 0.5`` (closed-form pre-training; the point itself solves in ~0.2 s);
* ``linear_sweep_3``: ``hdlora sweep FILE --no-progress`` on a 3-point linear theory sweep into a
  fresh database (default workers, as typed by a user), and the same with ``--workers 1``.

The old code is another checkout's ``src`` (default ``/work/wt/base/src``, the commit before the
instant-CLI change), put first on ``PYTHONPATH``; the new one is this checkout's.  Old and new
alternate, ``--repeats`` times each; the minimum (least disturbed by the shared machine) and the
median are reported, with the ratio old / new of the minima.

Usage: python benchmarks/bench_cli.py [--old-src DIR] [--repeats N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINEAR = [
    "--activation",
    "linear",
    "--alpha",
    "0.1",
    "--alpha-ft",
    "3",
    "--tokens",
    "3",
    "--noise",
    "0.5",
    "--lam",
    "0.1",
    "--lam-ft",
    "0.5",
]
SWEEP = """[sweep]
name = "bench-cli"
database = "{db}"

[params]
alpha = 0.1
alpha_ft = 3.0
tokens = 3
noise = 0.5
lam = 0.1
activation = "linear"

[axes]
lam_ft = [0.1, 0.5, 2.0]

[run.theory]
"""


def _env(src: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _which(src: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import hdlora; print(hdlora.__file__)"],
        env=_env(src),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _time(argv: list[str], src: Path, ok=(0,)) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "hdlora.cli", *argv], env=_env(src), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode not in ok:
        raise RuntimeError(f"{argv} with {src}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-src", default="/work/wt/base/src", help="src directory of the old code")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of each fast case (old and new alternate)")
    ap.add_argument("--sweep-repeats", type=int, default=3, help="repeats of each sweep case")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another src directory measured alongside (e.g. this branch merged with another)",
    )
    args = ap.parse_args()
    old, new = Path(args.old_src).resolve(), ROOT / "src"
    sources = {"old": old, "new": new}
    for item in args.extra:
        name, _, path = item.partition("=")
        sources[name] = Path(path).resolve()
    which = {k: _which(v) for k, v in sources.items()}
    assert which["old"] != which["new"], which
    tmp = Path(tempfile.mkdtemp(prefix="bench_cli_"))

    def sweep_case(extra: list[str]):
        counter = iter(range(10**6))

        def argv() -> list[str]:
            i = next(counter)
            f = tmp / f"sweep{i}.toml"
            f.write_text(SWEEP.format(db=tmp / f"db{i}.sqlite"))
            return ["sweep", str(f), "--no-progress", *extra]

        return argv

    cases = {
        "help": (lambda: ["--help"], args.repeats),
        "theory_help": (lambda: ["theory", "--help"], args.repeats),
        "linear_point": (lambda: ["theory", *LINEAR], args.repeats),
        "linear_sweep_3": (sweep_case([]), args.sweep_repeats),
        "linear_sweep_3_workers_1": (sweep_case(["--workers", "1"]), args.sweep_repeats),
    }
    load_before = os.getloadavg()
    results = {}
    for name, (make_argv, n) in cases.items():
        times: dict[str, list[float]] = {k: [] for k in sources}
        for _ in range(n):
            for which_code in sources:
                times[which_code].append(_time(make_argv(), sources[which_code]))
        r = {f"{k}_min_s": round(min(v), 4) for k, v in times.items()}
        r.update({f"{k}_median_s": round(statistics.median(v), 4) for k, v in times.items()})
        for k in sources:
            if k != "old":
                r[f"ratio_old_over_{k}"] = round(min(times["old"]) / min(times[k]), 2)
        r["repeats"] = n
        results[name] = r
        print(f"{name}: {r}", file=sys.stderr)
    doc = {
        "benchmark": "bench_cli",
        "what": "process wall time of `python -m hdlora.cli ...` (fresh interpreter each), old vs new code, "
        "alternating, min and median of the repeats",
        "sources": {k: str(v) for k, v in sources.items()},
        "imported_from": which,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
