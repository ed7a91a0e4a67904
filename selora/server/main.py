"""``selora serve``: the REST service on uvicorn (see DESIGN.md, REST and CLI contracts)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress

from selora.server import settings as settings_module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from selora.server.app import create_app

    settings = settings_module.Settings.load(args)
    try:  # a device, dtype or kernel setting this machine cannot honour stops here, before the server starts
        settings.torch_dtype()
        settings.kernel_config()
    except settings_module.SettingsError as e:
        raise SystemExit(f"selora serve: {e}") from None
    if not _loopback(settings.host) and not settings.allow_unauthenticated:
        from selora.runtime.store import AdapterStore

        if not AdapterStore(settings.store).has_keys():
            raise SystemExit(f"selora serve: the store holds no API key, so anyone reaching {settings.host} could use and change "
                             "every adapter; create one (selora keys create --tenant T) or pass --allow-unauthenticated")
    if settings.ray:
        try:
            from selora.server.ray_serve import run_on_ray
        except ImportError as e:
            raise SystemExit(f"selora serve --ray needs Ray Serve: pip install 'selora[ray]' ({e})") from None
        try:
            return run_on_ray(settings)
        except settings_module.SettingsError as e:
            raise SystemExit(f"selora serve: {e}") from None
    app = create_app(settings, on_load_failure=lambda: setattr(server, "should_exit", True))
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info"))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C / SIGINT: a clean stop, as uvicorn.run does
        server.run()
    if app.state.load_error:  # fail fast: a base that cannot load ends the process, naming the cause
        raise SystemExit(f"selora serve: {app.state.load_error}")
    if not server.started:  # e.g. the port is taken (uvicorn has logged why)
        raise SystemExit(f"selora serve: could not start on {settings.host}:{settings.port}")
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
