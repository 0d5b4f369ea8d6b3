"""Serve the explorer: a Bokeh server bound to one address (127.0.0.1 by default) on a free or given port."""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence

from ..params import ParamError
from .model import View


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(
    view: View, sim_rows: Sequence[dict] = (), *, host: str = "127.0.0.1", port: int = 0, open_browser: bool = True
) -> int:
    """Start the server, print its URL on stdout (one line, flushed), serve until interrupted."""
    from bokeh.server.server import Server

    from .app import make_app

    if port == 0:
        port = free_port(host)
    origins = [f"{h}:{port}" for h in {host, "127.0.0.1", "localhost"}]
    try:
        server = Server(
            {"/": make_app(view, sim_rows)}, address=host, port=port, allow_websocket_origin=origins, num_procs=1
        )
    except OSError as exc:
        raise ParamError(
            f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); "
            "choose another port or --port 0 for a free one"
        ) from None
    server.start()
    url = f"http://{host}:{port}/"
    print(f"hdlora explore: serving {url}  (Ctrl-C to stop)", flush=True)
    if open_browser:
        server.io_loop.add_callback(server.show, "/")
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        print("hdlora explore: stopped", file=sys.stderr)
    finally:
        server.stop()
    return 0
