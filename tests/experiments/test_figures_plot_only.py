"""``hdlora figure N --plot-only`` draws only the rows of its own tasks: after a run in another mode it refuses
(exit 2, one line) and leaves the good PNG / PDF / CSV as they are; an incomplete figure says what is missing."""

from __future__ import annotations

import hashlib
import re
import sqlite3

from hdlora.cli import main as hdlora_main


def digests(out, n):
    return {s: hashlib.sha256((out / f"fig{n}.{s}").read_bytes()).hexdigest() for s in ("png", "pdf", "csv")}


def test_plot_only_in_another_mode_refuses_to_replace_the_figure(tmp_path, capsys):
    out = tmp_path / "figs"
    common = ["--out", str(out), "--no-progress"]
    assert hdlora_main(["figure", "5", "--tiny", "--workers", "1", *common]) == 0
    capsys.readouterr()
    before = digests(out, 5)
    # paper mode (D = 5000, 5 seeds, n_mc = 30000): none of its tasks is stored
    assert hdlora_main(["figure", "5", "--plot-only", *common]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "none of its" in lines[0] and "D = 5000" in lines[0], cap.err
    assert "--tiny" in lines[0] and "left as it is" in lines[0]
    assert digests(out, 5) == before
    # its own mode draws again (same rows, exit 0)
    assert hdlora_main(["figure", "5", "--tiny", "--plot-only", *common]) == 0
    # a missing task: drawn from what is there, said on stderr and in the footer, exit 1
    con = sqlite3.connect(out / "fig5.sqlite")
    con.execute("DELETE FROM results WHERE id = (SELECT MIN(id) FROM results)")
    con.commit()
    con.close()
    capsys.readouterr()
    assert hdlora_main(["figure", "5", "--tiny", "--plot-only", *common]) == 1
    err = capsys.readouterr().err
    assert "drawn from what is stored" in err and re.search(r"\d+ of \d+ tasks stored as ok", err), err
