"""`llamastream serve | download`: the command line. The only place that configures logging."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
import typing
from collections.abc import Generator
from types import FrameType

import uvicorn
from pydantic import ValidationError

from llamastream.config import Settings

if typing.TYPE_CHECKING:
    from llamastream.service import Service

logger = logging.getLogger("llamastream")

# Short names for the flags people type most; every Settings field also has --field-name.
ALIASES = {
    "model_path": ["--model", "-m"],
    "num_of_concurrent_executions": ["--slots"],
    "max_queue_size": ["--queue"],
}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (also LLAMASTREAM_<NAME> environment variables)")
    for name, info in Settings.model_fields.items():
        flags = [*ALIASES.get(name, []), "--" + name.replace("_", "-")]
        if info.annotation is bool:
            group.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, help=info.description
            )
        else:
            default = info.default if info.default is not None else "unset"
            group.add_argument(
                *flags, dest=name, metavar="VALUE", help=f"{info.description} [{default}]"
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the flags given; the rest from the environment and the defaults."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    for name, value in list(given.items()):
        shape = typing.get_origin(Settings.model_fields[name].annotation)
        kinds = {
            typing.get_origin(a) for a in typing.get_args(Settings.model_fields[name].annotation)
        }
        items = typing.get_args(Settings.model_fields[name].annotation)
        if ((shape is list or list in kinds) and items == (str,)) or name == "tensor_split":
            given[name] = [item.strip() for item in value.split(",") if item.strip()]
        elif shape in (dict, list):
            try:
                given[name] = json.loads(value)
            except ValueError:
                raise SystemExit(f"llamastream: --{name.replace('_', '-')} takes JSON") from None
    return Settings(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamastream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    _add_settings_flags(serve)
    download = commands.add_parser(
        "download", help="download a model into models/ (see `llamastream download -h`)"
    )
    download.add_argument("args", nargs=argparse.REMAINDER)
    chat = commands.add_parser(
        "chat", help="chat in the console with a server or a model (see `llamastream chat -h`)"
    )
    chat.add_argument("args", nargs=argparse.REMAINDER)
    return parser


class _DrainingServer(uvicorn.Server):
    """uvicorn, draining the service on the first SIGTERM/SIGINT before it stops.

    While draining, the server still answers: health says 503 so balancers stop sending,
    new requests get 503 + Retry-After, running streams get `shutdown_grace_s` to finish.
    A second signal stops the running streams at once (partial replies saved).
    """

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Future[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            # Drained and stopped: exit 0 rather than re-raising the signal as uvicorn does.
            self._captured_signals.clear()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        if self._draining:
            # Again: stop waiting for the streams; shutdown stops them now.
            self._loop.call_soon_threadsafe(self._end_drain)
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _end_drain(self) -> None:
        task = self._drain_task
        if task is not None and not task.done():
            logger.info("signal again: stopping the running streams now")
            task.cancel()

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        logger.info("signal %d: draining (grace %g s)", sig, self.service.settings.shutdown_grace_s)

        async def drain_then_exit() -> None:
            try:
                await self.service.drain()
            finally:
                super(_DrainingServer, self).handle_exit(sig, frame)

        self._drain_task = asyncio.ensure_future(drain_then_exit())


def serve(settings: Settings) -> None:
    from llamastream.api.app import create_app  # the engine loads only for `serve`
    from llamastream.download import fetch

    if settings.model_path is None and not settings.models and not settings.serve_models_dir:
        logger.info(
            "no model configured: fetching the default model %r into %s/ (first run only)",
            settings.default_model,
            settings.models_dir,
        )
        path = fetch(settings.default_model, settings.models_dir)
        settings = settings.model_copy(update={"model_path": path})
    first = settings.model_path or (
        settings.models[0].name if settings.models else settings.models_dir
    )
    logger.info("serving %s on http://%s:%d", first, settings.host, settings.port)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        access_log=False,  # llamastream.access logs every request, with its request id
        timeout_graceful_shutdown=5,
    )
    _DrainingServer(config, app.state.service).run()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["download"]:
        from llamastream.download import main as download_main

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        raise SystemExit(download_main(argv[1:]))
    if argv[:1] == ["chat"]:
        from llamastream.console import main as chat_main

        raise SystemExit(chat_main(argv[1:]))
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", None) or "info"
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s",
    )
    from llamastream.api.middleware import RequestIdFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    try:
        serve(settings_from_args(args))
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            print(f"llamastream: invalid setting {field}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
