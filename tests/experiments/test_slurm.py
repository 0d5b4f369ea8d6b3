"""``--cluster slurm`` options: parsed and validated before anything starts (no SLURM needed).

Bad options give one line naming the option and its allowed values, exit status 2; the sweep
command does not import dask_jobqueue unless --cluster is given.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hdlora.experiments.slurm import ClusterOptionError, parse_cluster_options


def test_defaults_one_job_one_core_one_thread():
    o = parse_cluster_options([])
    assert (o.jobs, o.cores, o.processes, o.adapt, o.walltime) == (1, 1, None, None, "01:00:00")
    kw = o.__class__(**{**o.__dict__, "host": "10.0.0.5"}).cluster_kwargs()
    assert kw["processes"] == kw["cores"] == 1 and kw["memory"] == "2GB"
    assert kw["scheduler_options"]["host"] == "10.0.0.5"
    assert kw["job_script_prologue"][:3] == [
        "export OMP_NUM_THREADS=1",
        "export MKL_NUM_THREADS=1",
        "export OPENBLAS_NUM_THREADS=1",
    ]


def test_options_are_parsed():
    o = parse_cluster_options(
        [
            "cores=4",
            "processes=2",
            "memory=8GiB",
            "walltime=1-02:00:00",
            "queue=gpu",
            "account=proj",
            "job_extra_directives=--qos=short",
            "job_extra_directives=--exclusive",
            "job_script_prologue=module load python",
            "host=127.0.0.1",
            "port=8786",
            "log-directory=/tmp/x",
        ],
        workers=3,
    )
    assert (o.cores, o.processes, o.memory, o.walltime, o.queue, o.account, o.jobs, o.port) == (
        4,
        2,
        "8GiB",
        "1-02:00:00",
        "gpu",
        "proj",
        3,
        8786,
    )
    assert o.job_extra_directives == ["--qos=short", "--exclusive"] and o.log_directory == "/tmp/x"
    kw = o.cluster_kwargs()
    assert kw["job_script_prologue"][-1] == "module load python" and kw["queue"] == "gpu"
    a = parse_cluster_options(["adapt=0:10"])
    assert a.adapt == (0, 10) and a.jobs is None


@pytest.mark.parametrize(
    "pairs, workers, words",
    [
        (["cores=0"], None, "cores=0: expected an integer >= 1"),
        (["cores=two"], None, "cores=two"),
        (["cores=4", "processes=3"], None, "must divide cores=4"),
        (["memory=lots"], None, "memory=lots"),
        (["walltime=1h"], None, "walltime=1h"),
        (["adapt=5:2"], None, "adapt=5:2"),
        (["adapt=0:4"], 2, "adapt=MIN:MAX replaces"),
        (["jobs=3"], 2, "disagree"),
        (["port=70000"], None, "port=70000: expected an integer in 0..65535"),
        (["gpus=1"], None, "unknown key; known keys: cores"),
        (["cores"], None, "expected KEY=VALUE"),
        (["cores=1", "cores=2"], None, "given twice"),
        (["job_extra_directives=exclusive"], None, "without #SBATCH"),
        (["queue=a b"], None, "no spaces"),
    ],
)
def test_bad_options_are_refused(pairs, workers, words):
    with pytest.raises(ClusterOptionError, match=None) as exc:
        parse_cluster_options(pairs, workers)
    assert words in str(exc.value) and "\n" not in str(exc.value)


SWEEP = """
[sweep]
name = "x"
[params]
alpha = 0.5
alpha_ft = 1.0
tokens = 2
lam = 0.1
lam_ft = 0.5
activation = "linear"
[axes]
noise = [0.1, 0.5]
[run.theory]
n_mc = 200
"""


@pytest.mark.parametrize(
    "args, words",
    [
        (["--cluster", "slurm", "--cluster-option", "walltime=forever"], "walltime=forever: expected SLURM's format"),
        (["--cluster-option", "cores=2"], "--cluster-option needs --cluster slurm"),
        (["--cluster", "slurm", "--scheduler", "tcp://127.0.0.1:1"], "either --cluster or --scheduler"),
        (["--cluster", "slurm", "--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_cli_refuses_bad_cluster_options_in_one_line(tmp_path, args, words):
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(SWEEP))
    for cmd in (
        ["hdlora.experiments.cli", str(path)],
        ["hdlora.experiments.figure_cli", "1", "--tiny", "--out", str(tmp_path / "fig")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", *cmd, "--no-progress", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], proc.stderr
        assert not (tmp_path / "fig").exists()


def test_sweep_without_cluster_does_not_import_dask_jobqueue():
    code = "import sys; from hdlora.experiments import cli, executor, sweep; sys.exit('dask_jobqueue' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
