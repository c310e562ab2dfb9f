"""Mailbox: a combined POP3 + SMTP mail server appliance on Twisted."""

__version__ = "0.1.0"
