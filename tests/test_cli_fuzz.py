"""Fuzz the command line (hypothesis): any input ends in exit 0 or exit 2 with ONE stderr line, never a traceback.

The flags of ``theory``, ``simulate``, ``optimize`` (through ``--dry-run``), ``figure`` (through
``--plan``) and sweep files (through ``hdlora sweep FILE --plan``) are drawn from the parsers
themselves, so a new flag is fuzzed without editing this file.  Nothing real runs: the parse and
validation stage only, in-process for speed; one subprocess case checks the real executable.
"""

import subprocess
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hdlora import cli  # noqa: E402

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# values that have broken parsers before, plus arbitrary short text and numbers
SPECIAL = [
    "nan",
    "inf",
    "-inf",
    "NaN",
    "-1",
    "0",
    "-0",
    "1",
    "2",
    "3",
    "0.5",
    "3e4",
    "1e400",
    "1e-13",
    "1000.5",
    "1e9",
    "abc",
    "",
    " ",
    "optimal",
    "optimal-theory",
    "linear",
    "softmax",
    "frozen",
    "lora-only",
    "cpu",
    "cuda",
    "tpu",
    "attention",
    "lam",
    "lam,lam_ft",
    "lam=1e-3:10",
    "lam=5:1",
    "beta=0:1",
    "foo",
    "tcp://127.0.0.1:1",
    "x:y",
    "1,2",
    "\u00b1",
    "-",
    "--",
]
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(max_size=6),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**6), 10**12).map(str),
)

NO_FUZZ = {"-h", "--help", "--out", "--db", "--export", "--dry-run", "--plan"}


def _flags(command: str):
    """(option string, takes a value) for every flag of the command, from its parser."""
    parser = cli.build_parser(only=command)
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    out = []
    for a in sub.choices[command]._actions:
        if not a.option_strings or set(a.option_strings) & NO_FUZZ:
            continue
        out.append((a.option_strings[-1], a.nargs != 0))
    return out


def _argv(command: str):
    flags = _flags(command)

    @st.composite
    def draw(draw_):
        argv = []
        for flag, takes in draw_(st.lists(st.sampled_from(flags), max_size=6)):
            argv.append(flag)
            if takes:
                argv.append(draw_(VALUES))
        return argv

    return draw()


def check(rc: int, err: str, argv) -> None:
    assert rc in (0, 2), (rc, argv, err)
    assert "Traceback" not in err, (argv, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, lines)
        assert lines[0].startswith("hdlora"), (argv, lines)


def run(argv, capsys):
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "command,tail", [("theory", ["--dry-run"]), ("simulate", ["--dry-run"]), ("optimize", ["--dry-run"])]
)
def test_fuzz_model_commands(command, tail, capsys):
    @FUZZ
    @given(argv=_argv(command))
    def inner(argv):
        full = [command, *argv, *tail]
        check(*run(full, capsys), full)

    inner()


def test_fuzz_figure_plan(capsys, tmp_path):
    @FUZZ
    @given(
        number=st.one_of(st.sampled_from(["1", "2", "3", "4", "5", "6", "0", "7", "3e0", "nan"]), VALUES),
        argv=_argv("figure"),
    )
    def inner(number, argv):
        full = ["figure", number, *argv, "--plan", "--out", str(tmp_path / "fig")]
        check(*run(full, capsys), full)

    inner()


# sweep files: a few valid-looking tables with fuzzed keys and values
KEYS = st.sampled_from(
    [
        "alpha",
        "alpha_ft",
        "tokens",
        "kappa",
        "kappa0",
        "noise",
        "lam",
        "lam_ft",
        "reuse",
        "activation",
        "beta",
        "active_pool",
        "bogus",
    ]
)
TOML_VALUES = st.one_of(
    st.sampled_from(
        [
            "nan",
            "inf",
            "-inf",
            "0",
            "-1",
            "3",
            "0.5",
            "1e9",
            "1000.5",
            "true",
            '"linear"',
            '"softmax"',
            '"x"',
            "[]",
            "[1.0, 2.0]",
            "[0.5, nan]",
            "{start = 0.1, stop = 1.0, num = 2}",
            "{start = 1, stop = 0, num = -1}",
        ]
    ),
    st.integers(-5, 10**6).map(str),
)
RUN_OPTIONS = {
    "theory": ["n_mc", "seed", "tol", "baseline", "bogus"],
    "simulate": ["dim", "seeds", "device", "loss", "restarts", "bogus"],
}


@st.composite
def sweep_files(draw):
    lines = ["[sweep]", 'name = "fuzz"', 'database = "fuzz.sqlite"', "[params]"]
    for k in draw(st.lists(KEYS, max_size=4, unique=True)):
        lines.append(f"{k} = {draw(TOML_VALUES)}")
    lines.append("[axes]")
    for k in draw(st.lists(KEYS, min_size=1, max_size=2, unique=True)):
        lines.append(f"{k} = {draw(TOML_VALUES)}")
    kind = draw(st.sampled_from(sorted(RUN_OPTIONS)))
    lines.append(f"[run.{kind}]")
    for k in draw(st.lists(st.sampled_from(RUN_OPTIONS[kind]), max_size=3, unique=True)):
        lines.append(f"{k} = {draw(TOML_VALUES)}")
    return "\n".join(lines) + "\n"


def test_fuzz_sweep_file_plan(capsys, tmp_path):
    @FUZZ
    @given(text=sweep_files())
    def inner(text):
        path = tmp_path / "fuzz.toml"
        path.write_text(text)
        full = ["sweep", str(path), "--plan", "--db", str(tmp_path / "fuzz.sqlite")]
        check(*run(full, capsys), (full, text))

    inner()


def test_subprocess_smoke():
    """The real executable: a bad flag and a bad --tokens end in one line and exit 2."""
    for argv in (
        ["theory", "--tokens", "nan"],
        ["simulate", "--n-mc-typo", "3"],
        ["figure", "1", "--scheduler", "foo", "--plan"],
    ):
        out = subprocess.run([sys.executable, "-m", "hdlora.cli", *argv], capture_output=True, text=True, timeout=120)
        check(out.returncode, out.stderr, argv)
        assert out.returncode == 2
