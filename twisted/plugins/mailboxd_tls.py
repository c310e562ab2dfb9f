"""Mailbox's ``tls:`` server endpoint: implicit TLS (SMTPS, POP3S).

Twisted's ``serverFromString`` finds this plugin by its prefix, so it parses
and checks ``tls:PORT[:interface=...]`` itself. The parser, the endpoint and
how the endpoint gets its certificate are in `mailboxd.tls` (its docstring).
"""

from mailboxd.tls import ImplicitTLSParser

tls = ImplicitTLSParser()
