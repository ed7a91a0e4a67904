"""``selora serve``: the REST service on uvicorn (see DESIGN.md, REST and CLI contracts)."""

from __future__ import annotations

import argparse

from selora.server import settings as settings_module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from selora.server.app import create_app

    settings = settings_module.Settings.load(args)
    try:  # a device or dtype this machine cannot honour stops here, before the server starts
        settings.torch_dtype()
    except settings_module.SettingsError as e:
        raise SystemExit(f"selora serve: {e}") from None
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
