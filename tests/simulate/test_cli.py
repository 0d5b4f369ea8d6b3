"""``hdlora simulate``: JSON keys, table output, bad input -> exit 2 naming the parameter."""

import json
import math

import pytest
import torch

from hdlora import cli
from hdlora.simulate import KEYS


@pytest.fixture(autouse=True)
def only_simulate(monkeypatch):
    """Build the parser with this command only (other commands are other modules' business)."""
    monkeypatch.setattr(cli, "COMMANDS", {"simulate": cli.COMMANDS["simulate"]})
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # --threads sets a process-wide torch setting


BASE = [
    "simulate",
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
    "--dim",
    "20",
    "--seeds",
    "2",
]


def test_json_has_every_key(capsys):
    assert cli.main(BASE + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in KEYS:
        assert k in d and f"{k}_se" in d, k
    for k in (
        "pretrain_train_error",
        "pretrain_test_error",
        "finetune_test_error",
        "forgetting_error",
        "overlap",
        "Q",
        "M",
        "q",
        "m",
    ):
        assert isinstance(d[k], float) and math.isfinite(d[k]), k
    assert d["n_seeds"] == 2 and d["dim"] == 20 and d["wall_time_total"] > 0
    assert d["params"]["lam"] == 0.1 and len(d["per_seed"]) == 2


def test_json_effective_mode(capsys):
    assert cli.main(BASE + ["--json", "--effective-Q0", "2", "--effective-Q", "1", "--effective-M", "1"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "effective" and d["Q"] == 1.0 and d["pretrain_train_error"] is None


def test_table_and_progress(capsys):
    assert cli.main(BASE + ["--lam-ft", "inf", "--seeds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr()
    assert "finetune_test_error" in out.out and "overlap" in out.out
    assert "simulate" in out.err  # tqdm bar on stderr


@pytest.mark.parametrize(
    "extra,word",
    [
        (["--kappa", "0.5"], "kappa"),
        (["--kappa0", "0"], "kappa0"),
        (["--tokens", "1"], "tokens"),
        (["--alpha", "0"], "alpha"),
        (["--alpha-ft", "-1"], "alpha_ft"),
        (["--noise", "-1"], "noise"),
        (["--lam", "-1"], "lam"),
        (["--lam-ft", "-1"], "lam_ft"),
        (["--noise", "nan"], "noise"),
        (["--activation", "relu"], "activation"),
        (["--beta", "0"], "beta"),
        (["--dim", "1"], "dim"),
        (["--seeds", "0"], "seeds"),
        (["--loss", "mse"], "loss"),
        (["--device", "tpu"], "device"),
        (["--restarts", "-1"], "restarts"),
        (["--threads", "-1"], "threads"),
        (["--effective-Q0", "1"], "effective"),
        (["--effective-Q0", "1", "--effective-Q", "1", "--effective-M", "9"], "M"),
        (["--reuse", "--alpha", "0.001"], "reuse"),
    ],
)
def test_bad_input_exit_2_names_parameter(extra, word, capsys):
    assert cli.main(BASE + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
