from twisted.application.service import ServiceMaker

mailbox = ServiceMaker(
    "mailbox", "mailboxd.tap", "Mailbox: a combined POP3 + SMTP mail appliance", "mailbox"
)
