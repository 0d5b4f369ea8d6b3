"""``hdlora explore``: an interactive explorer of the theory curves in the browser.

Sliders for alpha, alpha', T, kappa0, kappa, Delta, lambda, lambda', beta, e and sigma; a
choice of x-axis; the curves E' (fine-tuning test error), o_w (overlap) and Delta_eff
(eqs. 25-26) from :func:`hdlora.theory.solve` along that axis; simulation markers from a
results database; the ``hdlora theory`` / ``hdlora sweep`` command that reproduces the view;
the figure as a PNG.

Why Bokeh (a plain Bokeh server) and not Panel or marimo:

* the explorer is a handful of widgets and three plots; a Bokeh server serves them from
  Python with one dependency (Panel is built on Bokeh and would add param, pyviz_comms,
  markdown and a larger start-up for no widget we need);
* the plotted data live in named ``ColumnDataSource`` objects that the page's BokehJS
  exposes (``Bokeh.documents[0].get_model_by_name("theory").data``), so a browser test
  reads what is drawn instead of comparing screenshots;
* server-side callbacks run in the Python process next to the solver, so slow points are
  computed in a background thread and pushed point by point (``add_next_tick_callback``),
  which a marimo app (re-running reactive cells) does not give as directly.

Modules: :mod:`.model` (the view, curves, markers, commands, PNG; no web code),
:mod:`.app` (the Bokeh document), :mod:`.server` (binding and serving), :mod:`.cli`.
Neither imports torch: the theory is numpy/scipy and the database is SQLite.
"""

from __future__ import annotations

from .model import View, solve_curve

__all__ = ["View", "solve_curve"]
