"""Every option of every [run.*] table is checked when the sweep file is loaded (so --plan catches it), in one
line naming the file, the table, the option and the allowed values; a run ends with its errors summarised."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    return subprocess.run(
        [sys.executable, "-m", "hdlora.experiments.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


SIM = "[run.simulate]\ndim = 12\nseeds = 1\n"
BAD = {
    "simulate typo": (SIM + "bogus_option = 3\n", ["[run.simulate]", "bogus_option", "allowed", "restarts"]),
    "simulate loss": (SIM + "loss = 'foo'\n", ["[run.simulate]", "loss = 'foo'", "'sequence' | 'attention'"]),
    "simulate restarts": (SIM + "restarts = -1\n", ["[run.simulate]", "restarts = -1", "integer >= 0"]),
    "simulate device name": (SIM + "device = 'gpu'\n", ["[run.simulate]", "device = 'gpu'", "'cpu' | 'auto'"]),
    "simulate rtol": (SIM + "pretrain_rtol = -1e-5\n", ["pretrain_rtol = -1e-05", "number > 0"]),
    "simulate effective": (SIM + "effective = {Q0 = 1.0}\n", ["effective", "Q0 = ..., Q = ..., M = ..."]),
    "theory n_mc small": ("[run.theory]\nn_mc = 1\n", ["[run.theory]", "n_mc = 1:", "integer >= 100"]),
    "theory n_mc text": ("[run.theory]\nn_mc = 'many'\n", ["[run.theory]", "n_mc = 'many'", "integer >= 100"]),
    "theory n_mc fraction": ("[run.theory]\nn_mc = 1000.5\n", ["[run.theory]", "n_mc = 1000.5", "integer >= 100"]),
    "theory method": ("[run.theory]\nmethod = 'magic'\n", ["[run.theory]", "method = 'magic'", "'mc'"]),
    "theory via baseline": (
        "[run]\nbaselines = ['frozen']\n[run.theory]\nwarn = 'yes'\n",
        ["warn = 'yes'", "true | false"],
    ),
    "bayes nodes": ("[run.bayes_optimal]\nn_nodes = 0\n", ["[run.bayes_optimal]", "n_nodes = 0", "integer >= 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_option_values_fail_at_load_with_one_line(tmp_path, capsys, case):
    from hdlora.experiments.cli import main

    text, words = BAD[case]
    f = tmp_path / "s.toml"
    f.write_text("[axes]\nalpha_ft = [1.0, 2.0]\n" + text)
    for extra in (["--plan"], []):
        assert main([str(f), *extra, "--workers", "1", "--no-progress"]) == 2, case
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(f) in lines[0], err
        for w in words:
            assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "s.sqlite").exists()


def test_bad_option_through_the_command_line(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[axes]\nalpha_ft = [1.0, 2.0]\n" + BAD["simulate typo"][0])
    r = cli(str(f), "--plan")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "bogus_option" in r.stderr


@pytest.mark.skipif(_cuda(), reason="this machine has a CUDA GPU: device = 'cuda' is valid here")
def test_cuda_without_a_gpu_fails_at_plan(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[axes]\nalpha_ft = [1.0]\n" + SIM + "device = 'cuda'\n")
    r = cli(str(f), "--plan")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "[run.simulate] device = 'cuda': no CUDA GPU" in r.stderr and "'cpu' | 'auto'" in r.stderr
    r = cli(str(f), "--plan", "--scheduler", "tcp://gpu-cluster:8786")  # the cluster's workers may have one
    assert r.returncode == 0, r.stderr


def test_good_options_pass(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(
        textwrap.dedent("""
        [axes]
        alpha_ft = [1.0, 2.0]
        [run]
        baselines = ["frozen"]
        [run.theory]
        n_mc = 1000
        tol = 1e-7
        method = "mc"
        optimal_beta = false
        [run.simulate]
        dim = 12
        seeds = [0, 3]
        loss = "attention"
        restarts = 0
        device = "cpu"
        effective = {Q0 = 1.5, Q = 0.5, M = 0.5}
        n_test = 50
        [run.bayes_optimal]
        n_nodes = 6
        """)
    )
    r = cli(str(f), "--plan")
    assert r.returncode == 0, r.stderr


def test_end_of_run_prints_the_first_error_and_a_count_per_distinct_error(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[axes]\nalpha_ft = [1.0, 2.0, 3.0, 4.0, 5.0]\n[run.'_sweep_kinds:failing']\n")
    r = cli(str(f), "--workers", "1", "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr
    assert "first failure: [run._sweep_kinds:failing] at alpha_ft=1.0: ValueError: deliberate failure odd" in err
    assert "3 task(s): ValueError: deliberate failure odd" in err
    assert "2 task(s): ValueError: deliberate failure even" in err
    r = cli(str(f), "--workers", "1", "--no-progress")  # nothing to do: the stored failures are summarised again
    assert r.returncode == 1 and "3 task(s): ValueError: deliberate failure odd" in r.stderr
