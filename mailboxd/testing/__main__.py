"""`python -m mailboxd.testing --ready-file ports.json`: a MailServer in this
process, for a parent process or a suite not written in Python."""

from .child import serve

serve()
