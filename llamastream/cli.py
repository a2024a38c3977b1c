"""`llamastream serve | download`: the command line. The only place that configures logging."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

from pydantic import ValidationError

from llamastream.config import Settings

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
        if shape is list or list in kinds:
            given[name] = [item.strip() for item in value.split(",") if item.strip()]
        elif shape is dict:
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
    return parser


def serve(settings: Settings) -> None:
    import uvicorn

    from llamastream.api.app import create_app
    from llamastream.download import fetch

    if settings.model_path is None:
        logger.info(
            "no model configured: fetching the default model %r into %s/ (first run only)",
            settings.default_model,
            settings.models_dir,
        )
        path = fetch(settings.default_model, settings.models_dir)
        settings = settings.model_copy(update={"model_path": path})
    logger.info("serving %s on http://%s:%d", settings.model_path, settings.host, settings.port)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        timeout_graceful_shutdown=10,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["download"]:
        from llamastream.download import main as download_main

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        raise SystemExit(download_main(argv[1:]))
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", None) or "info"
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(settings_from_args(args))
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            print(f"llamastream: invalid setting {field}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
