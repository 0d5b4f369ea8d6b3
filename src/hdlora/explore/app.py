"""The explorer's Bokeh document: controls, three linked plots, background solves, command and PNG export.

One document per browser tab.  Every change of a control (sliders on release) starts a new
*generation*: a single background thread solves the points of the axis in order (each
warm-started from its converged neighbour) and pushes each finished point to the page through
``doc.add_next_tick_callback``, so the page stays responsive, the curve fills in point by point
and the progress line says how far it is.  A newer generation makes the older one stop at its
next point.  Where a whole curve takes under a second or so (linear sigma, small n_mc) this
reads as a live update; slower points (softmax, large n_mc) fill in with the progress shown.

The data the page plots live in named ColumnDataSources (``theory``, ``nonconverged``,
``replicon``, ``simulation``), which the browser test reads through BokehJS.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from bokeh.layouts import column, row
from bokeh.models import (
    Button,
    Checkbox,
    ColumnDataSource,
    CustomJS,
    DataRange1d,
    Div,
    Legend,
    LegendItem,
    NumericInput,
    Select,
    Slider,
    TextAreaInput,
    Whisker,
)
from bokeh.plotting import figure

from ..params import ParamError, Params
from .model import (
    AXES,
    CURVES,
    INTEGER_FIELDS,
    SLIDERS,
    CurvePoint,
    View,
    curve_columns,
    render_png,
    simulation_markers,
    solve_curve,
    sweep_command,
    theory_command,
)

_EMPTY_CURVE: dict[str, list[float]] = {"x": [], **{n: [] for n in CURVES}}

_COPY_JS = """
const text = area.value;
function fallback() {
  const ta = document.createElement('textarea');
  ta.value = text; document.body.appendChild(ta); ta.select();
  try { document.execCommand('copy'); } catch (e) {}
  document.body.removeChild(ta);
}
if (navigator.clipboard && window.isSecureContext) {
  navigator.clipboard.writeText(text).catch(fallback);
} else { fallback(); }
button.label = 'Copied';
setTimeout(() => { button.label = 'Copy command'; }, 1500);
"""

_DOWNLOAD_JS = """
const png = src.data['png'];
if (!png || png.length === 0 || !png[0]) { return; }
const bytes = Uint8Array.from(atob(png[0]), c => c.charCodeAt(0));
const blob = new Blob([bytes], {type: 'image/png'});
const a = document.createElement('a');
a.href = URL.createObjectURL(blob);
a.download = src.data['name'][0];
document.body.appendChild(a); a.click(); document.body.removeChild(a);
setTimeout(() => URL.revokeObjectURL(a.href), 10000);
"""


class Explorer:
    """The state and widgets of one browser tab."""

    def __init__(self, doc, view: View, sim_rows: Sequence[dict] = ()) -> None:
        self.doc = doc
        self.view = view
        self.sim_rows = list(sim_rows)
        self.points: list[CurvePoint] = []
        self._last_axis = view.axis
        self.generation = 0
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hdlora-explore")

        self.sources = {
            name: ColumnDataSource(dict(_EMPTY_CURVE), name=name) for name in ("theory", "nonconverged", "replicon")
        }
        self.sources["simulation"] = ColumnDataSource(simulation_markers([], view), name="simulation")
        self.export_source = ColumnDataSource({"png": [], "name": []}, name="export")

        # controls
        p = view.params
        self.sliders: dict[str, Slider] = {}
        for name, (label, start, end, step) in SLIDERS.items():
            value = getattr(p, name)
            s = Slider(
                title=label,
                start=min(start, value),
                end=max(end, value),
                step=step,
                value=value,
                name=f"slider_{name}",
                css_classes=[f"hdl-slider-{name}"],
                width=300,
                format="0[.]000",
            )
            s.on_change("value_throttled", self._on_control)
            self.sliders[name] = s
        self.reuse = Checkbox(label="e = 1 (fine-tune on reused pre-training sequences)", active=p.reuse, name="reuse")
        self.reuse.on_change("active", self._on_control)
        self.activation = Select(
            title="σ (activation)", options=["linear", "softmax"], value=p.activation, name="activation", width=145
        )
        self.activation.on_change("value", self._on_control)
        self.axis = Select(
            title="x-axis", options=list(AXES), value=view.axis, name="axis", width=145, css_classes=["hdl-axis"]
        )
        self.axis.on_change("value", self._on_axis)
        self.start = NumericInput(title="from", value=view.start, mode="float", name="x_start", width=95)
        self.stop = NumericInput(title="to", value=view.stop, mode="float", name="x_stop", width=95)
        self.num = NumericInput(title="points", value=view.num, mode="int", name="x_num", width=95)
        self.log = Checkbox(label="log spacing", active=view.log, name="x_log")
        self.n_mc = Select(
            title="n_mc (Monte-Carlo samples)",
            name="n_mc",
            width=145,
            options=[str(n) for n in sorted({500, 1000, 2000, 5000, 10000, 30000, view.n_mc})],
            value=str(view.n_mc),
        )
        for w in (self.start, self.stop, self.num, self.n_mc):
            w.on_change("value", self._on_control)
        self.log.on_change("active", self._on_control)

        self.status = Div(text="", name="status", width=900)
        self.progress = Div(text="", name="progress", width=900)
        self.command = TextAreaInput(
            title="Command reproducing this view", value="", rows=9, cols=100, name="command", width=900
        )
        self.copy = Button(label="Copy command", name="copy", css_classes=["hdl-copy"], width=140)
        self.copy.js_on_click(CustomJS(args=dict(area=self.command, button=self.copy), code=_COPY_JS))
        self.save = Button(
            label="Save figure (PNG)", name="save_png", button_type="primary", css_classes=["hdl-save"], width=160
        )
        self.save.on_click(self._on_save)
        self.export_source.js_on_change("data", CustomJS(args=dict(src=self.export_source), code=_DOWNLOAD_JS))

        self.plots = row(*self._figures(), name="plots")
        controls = column(
            Div(
                text="<b>hdlora explore</b>: state-evolution curves (Results 3-5); drag a slider, release to recompute."
            ),
            *self.sliders.values(),
            self.reuse,
            row(self.activation, self.n_mc),
            row(self.axis, self.log),
            row(self.start, self.stop, self.num),
            width=320,
        )
        right = column(self.plots, self.progress, self.status, self.command, row(self.copy, self.save))
        self.layout = row(controls, right)
        self._sync_axis_controls()
        doc.add_root(self.layout)
        doc.add_root(self.export_source)  # not drawn, but its JS callback must live in the page
        doc.title = "hdlora explore"
        doc.on_session_destroyed(lambda ctx: self.close())
        self.recompute()

    # ----- plots -----------------------------------------------------------------------------------------
    def _figures(self) -> list:
        figs = []
        x_axis_type = "log" if self.view.log else "linear"
        for name, (_, label) in CURVES.items():
            # y-range at least 1e-3 wide: a flat curve (e.g. Delta_eff along alpha', which only the pre-training
            # sets) must not magnify the 1e-9 scatter of fixed points solved to tol 1e-7 into a trend
            f = figure(
                width=340,
                height=340,
                x_axis_type=x_axis_type,
                x_axis_label=self.view.axis,
                y_range=DataRange1d(min_interval=1e-3),
                y_axis_label=label,
                title=label,
                tools="pan,wheel_zoom,box_zoom,reset,hover",
                tooltips=[(self.view.axis, "@x"), (name, f"@{name}")],
                name=f"plot_{name}",
            )
            line = f.line("x", name, source=self.sources["theory"], line_width=2, color="#1f77b4")
            dots = f.scatter("x", name, source=self.sources["theory"], size=4, color="#1f77b4")
            bad = f.scatter(
                "x", name, source=self.sources["nonconverged"], marker="x", size=11, line_width=2, color="#1f77b4"
            )
            unstable = f.scatter(
                "x",
                name,
                source=self.sources["replicon"],
                marker="triangle",
                size=10,
                fill_color=None,
                line_color="#1f77b4",
            )
            sim = f.scatter("x", name, source=self.sources["simulation"], size=8, color="#d62728")
            f.add_layout(
                Whisker(
                    source=self.sources["simulation"],
                    base="x",
                    lower=f"{name}_lo",
                    upper=f"{name}_hi",
                    line_color="#d62728",
                )
            )
            legend = Legend(
                items=[
                    LegendItem(label="theory", renderers=[line, dots]),
                    LegendItem(label="not converged", renderers=[bad]),
                    LegendItem(label="replicon > 1", renderers=[unstable]),
                    LegendItem(label="simulation", renderers=[sim]),
                ],
                ncols=2,
                label_text_font_size="8pt",
                spacing=0,
                padding=2,
                margin=2,
                glyph_height=12,
                label_height=12,
            )
            f.add_layout(legend, "below")
            figs.append(f)
        return figs

    # ----- controls -> view ---------------------------------------------------------------------------------
    def _read_view(self) -> View:
        fixed = {name: s.value for name, s in self.sliders.items()}
        for name in INTEGER_FIELDS:
            fixed[name] = int(round(fixed[name]))
        params = Params(**fixed, reuse=bool(self.reuse.active), activation=self.activation.value)
        return View(
            params=params,
            axis=self.axis.value,
            start=float(self.start.value or 0),
            stop=float(self.stop.value or 0),
            num=int(self.num.value or 0),
            log=bool(self.log.active),
            n_mc=int(self.n_mc.value),
            seed=self.view.seed,
        )

    def _sync_axis_controls(self) -> None:
        for name, s in self.sliders.items():
            s.disabled = name == self.axis.value

    def _on_axis(self, attr: str, old: Any, new: str) -> None:
        start, stop, log = AXES[new]
        # the slider value of the old axis becomes a fixed parameter again; the new axis gets its default range
        for w, v in ((self.start, start), (self.stop, stop), (self.log, log)):
            w.remove_on_change("active" if w is self.log else "value", self._on_control)
            if w is self.log:
                w.active = v
            else:
                w.value = v
            w.on_change("active" if w is self.log else "value", self._on_control)
        self._sync_axis_controls()
        self._on_control(attr, old, new)

    def _on_control(self, attr: str, old: Any, new: Any) -> None:
        try:
            view = self._read_view()
        except ParamError as exc:
            self.status.text = f"<span style='color:#b00'>not computed: {exc}</span>"
            return
        rebuild = view.log != self.view.log or view.axis != self.view.axis
        self.view = view
        if rebuild:
            self.plots.children = self._figures()
        self.recompute()

    # ----- background solves ----------------------------------------------------------------------------------
    def recompute(self) -> None:
        view = self.view
        with self._lock:
            self.generation += 1
            gen = self.generation
        # warm start of the first point: the previous view's first point, when it converged on the same axis
        first = self.points[0] if self.points and self._last_axis == view.axis else None
        init = first.state if first is not None and first.converged else None
        self._last_axis = view.axis
        self.points = []
        for name in ("theory", "nonconverged", "replicon"):
            self.sources[name].data = dict(_EMPTY_CURVE)
        self.sources["simulation"].data = simulation_markers(self.sim_rows, view)
        self.command.value = (
            f"# one point (middle of the axis):\n{theory_command(view)}\n\n# the whole view:\n{sweep_command(view)}"
        )
        n = len(view.xs())
        self.progress.text = f"computing 0/{n} points ..."
        self.status.text = ""
        self.executor.submit(self._solve, gen, view, n, init)

    def _solve(self, gen: int, view: View, n: int, init: dict | None) -> None:
        t0 = time.perf_counter()

        def on_point(i: int, p: CurvePoint) -> None:
            self.doc.add_next_tick_callback(partial(self._push, gen, p, i + 1, n, time.perf_counter() - t0))

        try:
            solve_curve(view, init=init, on_point=on_point, cancelled=lambda: self.generation != gen)
        except Exception as exc:  # a bug, not bad input: show it rather than leave the page spinning
            self.doc.add_next_tick_callback(partial(self._failed, gen, f"{type(exc).__name__}: {exc}"))

    def _failed(self, gen: int, message: str) -> None:
        if gen == self.generation:
            self.progress.text = f"<span style='color:#b00'>failed: {message}</span>"

    def _push(self, gen: int, p: CurvePoint, done: int, n: int, elapsed: float) -> None:
        if gen != self.generation:
            return
        self.points.append(p)
        for name, data in curve_columns(self.points).items():
            self.sources[name].data = data
        per = elapsed / done
        if done < n:
            self.progress.text = (
                f"computing {done}/{n} points ... ({per:.2f} s/point, warm-started from the neighbouring point)"
            )
        else:
            self.progress.text = f"done: {n} points in {elapsed:.2f} s ({per:.2f} s/point)"
            bad = sum(not q.converged for q in self.points)
            unstable = sum(q.converged and not q.replicon_ok for q in self.points)
            errors = [q.error for q in self.points if q.error]
            sim = len(self.sources["simulation"].data["x"])
            parts = [f"{n - bad} of {n} points converged"]
            if bad:
                parts.append(f"{bad} not converged (x)")
            if unstable:
                parts.append(f"{unstable} replicon-violated (triangle)")
            if sim:
                parts.append(f"{sim} simulation markers from the database")
            if errors:
                parts.append(f"error: {errors[0]}")
            self.status.text = "; ".join(parts)

    # ----- export -------------------------------------------------------------------------------------------
    def _on_save(self) -> None:
        png = render_png(self.view, self.points, self.sources["simulation"].data)
        name = f"hdlora-explore-{self.view.axis}.png"
        self.export_source.data = {"png": [base64.b64encode(png).decode("ascii")], "name": [name]}
        self.status.text = f"saved figure: {name} ({len(png)} bytes)"

    def close(self) -> None:
        with self._lock:
            self.generation += 1
        self.executor.shutdown(wait=False, cancel_futures=True)


def make_app(view: View, sim_rows: Sequence[dict] = ()):
    """A Bokeh Application serving one :class:`Explorer` per session."""
    from bokeh.application import Application
    from bokeh.application.handlers import FunctionHandler

    return Application(FunctionHandler(lambda doc: Explorer(doc, view, sim_rows)))
