"""twistd plugin glue: `twistd mailbox --config PATH`."""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.python import usage

from . import __version__
from .config import ConfigError, load


class Options(usage.Options):
    synopsis = "[--config PATH] [--version]"
    optParameters = [
        [
            "config",
            "c",
            "etc/mailbox.ini",
            "The INI config file (relative to the current directory).",
        ],
    ]

    def opt_version(self) -> None:
        """Print Mailbox's version and exit (twistd --version prints Twisted's)."""
        print(f"mailbox (mailboxd) {__version__}")
        raise SystemExit(0)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from .clocks import use_monotonic_clock
    from .logs import Logged, for_twistd
    from .service import build

    # Mail, accounts and state are for the server's user only, whatever
    # umask it was started with (the folders and files are made so too).
    os.umask(0o077)
    try:
        config = load(options["config"])
    except ConfigError as e:
        raise SystemExit(e.said_by("mailbox")) from None
    use_monotonic_clock(reactor)  # before anything is scheduled
    # options.parent: twistd's own options, when twistd parsed ours.
    return Logged(build(config, reactor), for_twistd(options.parent, reactor, config.log.format))
