"""A zygote for the crash test: imports torch and builds the tiny model once, then for every
``start`` line on stdin forks a child that binds a free port on 127.0.0.1, prints
``<pid> <port>``, opens the store (its crash recovery), builds the engine and serves the real
app on uvicorn. The test SIGKILLs children; the next child is the restart.
Usage: forking_server.py STORE ROOT."""

from __future__ import annotations

import os
import socket
import sys

import uvicorn

from selora.models import load_backbone
from selora.server.app import build_engine, create_app
from tests.helpers import make_settings


async def _no_app(scope, receive, send) -> None:
    pass


def main(store: str, root: str) -> None:
    backbone = load_backbone("tiny-vit")
    uvicorn.Config(_no_app, log_level="warning").load()  # imports uvicorn's protocol modules once, before the forks
    for line in sys.stdin:
        while True:  # reap killed children
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if os.fork() == 0:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            print(os.getpid(), sock.getsockname()[1], flush=True)
            settings = make_settings(backbone, root, store=store)
            uvicorn.run(create_app(settings, build_engine(settings, backbone=backbone)), fd=sock.fileno(), log_level="warning")
            os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
