"""`hdlora explore` in a real browser: Debian's Chromium driven by Playwright (no downloaded browser).

The server runs in a subprocess on 127.0.0.1 on a free port.  The test reads what the page
plots from its Bokeh data sources (not from screenshots): the page loads and draws the theory
curve, simulation markers from a database appear where the parameters match, dragging the
Delta slider changes the plotted E', o_w and Delta_eff, the command field follows, the copy
button copies it, and the PNG export downloads PNG bytes.  A screenshot goes to docs/explorer.png
(the README shows it).

Run with ``make test-browser`` (installs Chromium and fonts with scripts/install_browser.sh).
Marked ``browser``: not part of the default ``make test`` run.  Skipped, with the reason, only
where Chromium or Playwright is not installed; ``HDLORA_REQUIRE_BROWSER=1`` (set by
``make test-browser``) turns that skip into a failure, so CI cannot pass without running it.
"""

from __future__ import annotations

import math
import os
import queue
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HDLORA_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "explorer.png"
POINTS = 6


def _unavailable(reason: str):
    if os.environ.get("HDLORA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"HDLORA_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (pip install 'hdlora[browser]')")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (scripts/install_browser.sh installs Debian's chromium)")
    try:
        import bokeh  # noqa: F401
    except ImportError:
        _unavailable("Bokeh is not installed (pip install 'hdlora[explore]')")
    with sync_playwright() as pw:
        yield pw


def _database(path: Path) -> None:
    """Two finite-D simulation rows at the explorer's parameters (alpha' = 1 and 3) and one at another
    noise (it must not be shown): the markers' values are read back from the page."""
    from hdlora import Params
    from hdlora.experiments.store import Store

    base = Params(activation="linear")
    with Store(path, version="test") as st:
        for p, E in [
            (base.replace(alpha_ft=1.0), 1.25),
            (base.replace(alpha_ft=3.0), 0.75),
            (base.replace(alpha_ft=2.0, noise=1.5), 9.0),
        ]:
            st.put(
                Store.key("simulate", p.to_dict(), {"dim": 40, "seeds": 2}),
                status="ok",
                run_id="t",
                result={
                    "finetune_test_error": E,
                    "finetune_test_error_se": 0.01,
                    "overlap": 0.5,
                    "overlap_se": 0.02,
                    "delta_eff": 1.0,
                    "delta_eff_se": 0.0,
                    "n_seeds": 2,
                    "dim": 40,
                },
            )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("explore") / "results.sqlite"
    _database(db)
    cmd = [
        sys.executable,
        "-c",
        "import sys; from hdlora.cli import main; sys.exit(main())",
        "explore",
        "--no-browser",
        "--port",
        "0",
        "--points",
        str(POINTS),
        "--n-mc",
        "500",
        "--database",
        str(db),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    url, seen, deadline = None, [], time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        try:
            ln = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(ln)
        m = re.search(r"serving (http://127\.0\.0\.1:\d+/)", ln)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        pytest.fail("hdlora explore did not print its URL:\n" + "".join(seen))
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _data(page, name: str) -> dict:
    return page.evaluate(
        """(name) => { const s = Bokeh.documents[0].get_model_by_name(name);
                       const out = {}; for (const [k, v] of Object.entries(s.data)) out[k] = Array.from(v);
                       return out; }""",
        name,
    )


def _wait_full_curve(page, min_done: float = 0) -> None:
    """Until the theory source holds all points and the progress line says done."""
    page.wait_for_function(
        """(n) => { const d = window.Bokeh && Bokeh.documents.length && Bokeh.documents[0].get_model_by_name('theory');
                    const p = d && Bokeh.documents[0].get_model_by_name('progress');
                    return d && d.data.x.length === n && p.text.startsWith('done'); }""",
        arg=POINTS,
        timeout=90_000,
    )


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    return struct.unpack(">II", data[16:24])


def test_explorer_in_chromium(playwright_api, server, tmp_path):
    t0 = time.perf_counter()
    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    try:
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.rstrip("/"))
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server)
        assert page.title() == "hdlora explore"
        _wait_full_curve(page)

        before = _data(page, "theory")
        assert len(before["x"]) == POINTS
        assert before["x"][0] == pytest.approx(0.2) and before["x"][-1] == pytest.approx(10.0)
        assert all(math.isfinite(v) and v > 0 for v in before["E"]), before
        # the simulation markers: exactly the two rows at the view's parameters, values as stored
        sim = _data(page, "simulation")
        assert sorted(zip(sim["x"], sim["E"])) == [(1.0, 1.25), (3.0, 0.75)]
        noise0 = page.evaluate("Bokeh.documents[0].get_model_by_name('slider_noise').value")
        assert noise0 == pytest.approx(0.5)

        # drag the Delta slider's handle to the right: the model value and the plotted data change
        handle = page.locator(".hdl-slider-noise .noUi-handle")
        box = handle.bounding_box()
        assert box is not None, "the Delta slider's handle is not on the page"
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 + 80, box["y"] + box["height"] / 2, steps=8)
        page.mouse.up()
        page.wait_for_function("Bokeh.documents[0].get_model_by_name('slider_noise').value > 0.6", timeout=10_000)
        noise1 = page.evaluate("Bokeh.documents[0].get_model_by_name('slider_noise').value")
        page.wait_for_function(
            "(e0) => { const d = Bokeh.documents[0].get_model_by_name('theory').data;"
            "          return d.x.length > 0 && d.E[0] !== e0; }",
            arg=before["E"][0],
            timeout=60_000,
        )
        _wait_full_curve(page)
        after = _data(page, "theory")
        assert after["x"] == before["x"]
        # more label noise: a larger fine-tuning test error and effective noise at every point
        assert all(a > b for a, b in zip(after["E"], before["E"])), (before["E"], after["E"])
        assert all(a > b for a, b in zip(after["delta_eff"], before["delta_eff"]))
        assert _data(page, "simulation")["x"] == []  # the stored rows are at Delta = 0.5 only
        command = page.evaluate("Bokeh.documents[0].get_model_by_name('command').value")
        # the README's picture: taken here, where the test database's (made-up) markers are not shown
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert f"--noise {noise1:g}" in command or f"noise = {noise1!r}" in command, command

        # copy button: the clipboard holds the command
        page.locator(".hdl-copy button").click()
        page.wait_for_timeout(300)
        assert page.evaluate("navigator.clipboard.readText()") == command

        # export: a PNG download of the figure
        with page.expect_download(timeout=60_000) as dl:
            page.locator(".hdl-save button").click()
        data = Path(dl.value.path()).read_bytes()
        w, h = _png_size(data)
        assert w > 500 and h > 200, (w, h)
        assert dl.value.suggested_filename.endswith(".png")

        # another x-axis: the curve is recomputed along lambda over its default range, the lambda slider is disabled
        page.locator(".hdl-axis select").select_option("lam")
        page.wait_for_function("Bokeh.documents[0].get_model_by_name('slider_lam').disabled", timeout=10_000)
        # the old curve (along alpha') is also complete and "done" until the recompute replaces it:
        # wait for the new axis's points, not just for a full curve (a race under load)
        page.wait_for_function(
            "Math.abs(Bokeh.documents[0].get_model_by_name('theory').data.x[0] - 0.001) < 1e-12", timeout=90_000
        )
        _wait_full_curve(page)
        along_lam = _data(page, "theory")
        assert along_lam["x"][0] == pytest.approx(0.001) and along_lam["x"][-1] == pytest.approx(5.0)
        assert len(set(along_lam["E"])) == POINTS  # E' varies with lambda
        assert errors == [], errors
    finally:
        browser.close()
    print(f"browser test: {time.perf_counter() - t0:.1f} s; screenshot {SCREENSHOT}")
