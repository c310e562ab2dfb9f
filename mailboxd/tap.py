"""twistd plugin glue: `twistd mailbox --config PATH`."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from .config import ConfigError, load


class Options(usage.Options):
    synopsis = "[--config PATH]"
    optParameters = [
        [
            "config",
            "c",
            "etc/mailbox.ini",
            "The INI config file (relative to the current directory).",
        ],
    ]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from .service import build

    try:
        config = load(options["config"])
    except ConfigError as e:
        raise SystemExit(f"mailbox: {e}") from None
    return build(config, reactor)
