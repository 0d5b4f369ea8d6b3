"""An instant CLI: --help imports nothing heavy; --version; defaults in --help; 3e4 where an integer is meant.

Not a timing test (benchmarks/bench_cli.py measures the time): it checks *what is imported*, in a
fresh interpreter, which is what makes the start-up slow.
"""

import json
import subprocess
import sys

import pytest

from hdlora import __version__, cli, code_version

HEAVY = ("torch", "dask", "distributed", "matplotlib", "pandas", "xarray", "scipy")

_PROBE = """
import json, sys
from hdlora.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:
    rc = e.code
sys.stdout.flush()
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print('\\nPROBE ' + json.dumps({"rc": rc, "heavy": heavy}))
"""


def _probe(argv, heavy=HEAVY):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argv), json.dumps(list(heavy))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("PROBE ")][-1]
    return json.loads(line[6:]), out


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["theory", "--help"],
        ["simulate", "--help"],
        ["optimize", "--help"],
        ["figure", "--help"],
        ["sweep", "--help"],
        ["--version"],
    ],
)
def test_help_imports_nothing_heavy(argv):
    res, out = _probe(argv)
    assert res["rc"] == 0, out.stderr
    assert res["heavy"] == [], f"{argv} imported {res['heavy']}"


def test_bad_flag_imports_nothing_heavy():
    res, out = _probe(["theory", "--tokens", "nan"])
    assert res["rc"] == 2 and res["heavy"] == []
    assert len(out.stderr.strip().splitlines()) == 1


def test_linear_theory_point_imports_no_dask_matplotlib_pandas():
    argv = [
        "theory",
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
        "--n-mc",
        "1000",
        "--json",
    ]
    res, out = _probe(argv, heavy=("dask", "distributed", "matplotlib", "pandas", "xarray", "torch"))
    assert res["rc"] == 0, out.stderr
    heavy = set(res["heavy"])
    # torch: the theory needs none; hdlora.activations imported it at module level before the
    # torch-free activations change, so it is only checked where activations no longer does
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, hdlora.activations; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.stdout.strip() == "True":
        heavy.discard("torch")
    assert heavy == set(), heavy


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert __version__ in out and code_version() in out


@pytest.mark.parametrize("command", ["theory", "simulate", "optimize", "figure", "sweep"])
def test_defaults_in_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default:" in out
    if command in ("theory", "simulate", "optimize"):
        assert "(default: 3)" in out  # --tokens
    assert "--quiet" in out


@pytest.mark.parametrize(
    "text,value", [("3e4", 30000), ("30000", 30000), ("3E4", 30000), ("1e2", 100), ("30000.0", 30000), ("-0", 0)]
)
def test_integer_accepts_integral_floats(text, value):
    assert cli.integer(text) == value and isinstance(cli.integer(text), int)


@pytest.mark.parametrize("text", ["1000.5", "nan", "inf", "-inf", "abc", "", "1e400"])
def test_integer_refuses_the_rest(text):
    with pytest.raises(Exception) as e:
        cli.integer(text)
    assert text in str(e.value) or repr(text) in str(e.value)


def test_n_mc_3e4_accepted_and_1000_5_refused_in_one_line(capsys):
    assert cli.main(["theory", "--n-mc", "3e4", "--dry-run"]) == 0
    capsys.readouterr()
    assert cli.main(["theory", "--n-mc", "1000.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n-mc" in err[0] and "1000.5" in err[0], err


def test_parser_constants_match_the_library():
    """The light CLI modules repeat a few constants of heavy modules; they must agree."""
    from hdlora.experiments import optimize, optimize_cli
    from hdlora.simulate import cli as sim_cli
    from hdlora.simulate import losses
    from hdlora.theory import BASELINES
    from hdlora.theory import cli as th_cli

    assert th_cli.BASELINES == BASELINES
    assert sim_cli.LOSSES == losses.LOSSES
    assert optimize_cli.TARGETS == tuple(optimize.TARGETS)
    assert optimize_cli.HYPERPARAMETERS == optimize.HYPERPARAMETERS
    assert optimize_cli.DEFAULT_BOUNDS == optimize.DEFAULT_BOUNDS
    assert optimize_cli.DEFAULT_XTOL == optimize.DEFAULT_XTOL


def test_lazy_packages_keep_their_names():
    import hdlora.simulate as sim
    import hdlora.simulate.run  # noqa: F401 (the submodule must not replace the function)
    import hdlora.theory as th

    assert callable(sim.run) and not isinstance(sim.run, type(sys))
    assert sim.run.__module__ == "hdlora.simulate.run"
    assert callable(th.solve) and th.BASELINES == ("frozen", "lora_only")
    with pytest.raises(AttributeError):
        sim.nothing_here  # noqa: B018


def test_progress_lines_without_carriage_returns():
    """Progress on a non-terminal stderr: plain lines, no \\r."""
    import io

    from hdlora.progress import bar

    buf = io.StringIO()
    b = bar(total=3, file=buf, desc="work", unit="step", log_interval=0.0)
    for _ in range(3):
        b.update(1)
    b.close()
    text = buf.getvalue()
    assert "\r" not in text and "work" in text and "3/3" in text
    assert all(line.strip() for line in text.splitlines())
