"""Start the page: ``serve(session, host, port)`` (``llava-next explore``, cli/explore.py).

    server = serve(session, host="127.0.0.1", port=7860, plan_picture=draw, block=False)
    server.url                # http://127.0.0.1:7860/
    server.close()

Binds 127.0.0.1 unless told otherwise: another host exposes the model to the network, and the caller
(the command line) must have been asked for it explicitly and must have said so (``is_local``).
Gradio is the optional ``explore`` extra: ``require_gradio`` says how to install it when it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .page import Page
from .session import ExploreError, Session

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
INSTALL = "pip install 'llava-next[explore]'"


def require_gradio():
    """The gradio module, or an ExploreError naming the extra to install."""
    try:
        import gradio
    except ImportError as e:
        raise ExploreError(f"llava-next explore needs Gradio, which is not installed ({e}); install the explore "
                           f"extra: {INSTALL}") from None
    return gradio


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS


@dataclass
class Server:
    blocks: Any  # the gradio.Blocks
    url: str

    def close(self) -> None:
        self.blocks.close()


def serve(session: Session, *, host: str = "127.0.0.1", port: int = 7860, plan_picture: Callable | None = None,
          block: bool = True) -> Server:
    """Launch the page on ``host:port``; ``block``: serve until interrupted (the command), else return at once
    (tests)."""
    require_gradio()
    blocks = Page(session, plan_picture).build()
    blocks.queue(default_concurrency_limit=1)  # one question at a time: the model is shared
    _, url, _ = blocks.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                              share=False, show_error=False)
    server = Server(blocks, url or f"http://{host}:{port}/")
    if block:
        blocks.block_thread()
    return server
