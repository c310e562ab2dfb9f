#!/usr/bin/env bash
# A test suite in another language: start Mailbox's test server with its HTTP
# API, send mail with curl's smtp://, and assert over HTTP with curl.
#   PYTHON=/path/to/python-with-mailboxd examples/curl/run.sh
set -euo pipefail
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }

"$PYTHON" -m mailboxd.testing --http 0 --ready-file "$work/ready.json" &
server=$!
for _ in $(seq 300); do [ -s "$work/ready.json" ] && break; sleep 0.1; done
[ -s "$work/ready.json" ] || fail "the server did not start"
port() { sed -E "s/.*\"$1\": ([0-9]+).*/\1/" "$work/ready.json"; }
smtp=$(port smtp_port)
api="http://127.0.0.1:$(port http_port)/api/v1"

# An account, over HTTP.
curl -sf -X POST "$api/accounts" -d '{"address": "alice@example.test", "password": "pw"}' >/dev/null
curl -sf "$api/accounts" | grep -q '"alice@example.test"' || fail "no account"

# Mail in, over SMTP.
printf 'From: shop@far.test\r\nTo: alice@example.test\r\nSubject: Welcome, Alice\r\n\r\nYour code is 4711.\r\n' \
    >"$work/mail.txt"
curl -sf "smtp://127.0.0.1:$smtp" --mail-from shop@far.test \
    --mail-rcpt alice@example.test --upload-file "$work/mail.txt"

# Wait for it (a long poll), then read it.
message=$(curl -sf "$api/wait?to=alice@example.test&subject=Welcome*&timeout=10") ||
    fail "the message did not arrive"
echo "$message" | grep -q '"envelope_from": "shop@far.test"' || fail "wrong sender: $message"
id=$(echo "$message" | sed -nE 's/^ "id": ([0-9]+),?$/\1/p')
curl -sf "$api/messages/$id/raw" | grep -q 'Your code is 4711' || fail "wrong body"
# The one-time code, as a sign-up test wants it.
curl -sf "$api/messages/$id/find?pattern=code%20is%20(%5Cd%2B)" | grep -q '"found": "4711"' ||
    fail "no code found"

# Nothing else arrives: a wait that times out is a 404.
status=$(curl -s -o /dev/null -w '%{http_code}' "$api/wait?subject=Other*&timeout=0.5")
[ "$status" = 404 ] || fail "expected 404 on timeout, got $status"

# A fault: the next RCPT is refused.
curl -sf -X POST "$api/faults" -d '{"point": "smtp.RCPT", "reply": [550, "5.1.1 no"], "times": 1}' >/dev/null
if curl -s "smtp://127.0.0.1:$smtp" --mail-from shop@far.test \
    --mail-rcpt alice@example.test --upload-file "$work/mail.txt"; then
    fail "the fault did not refuse the recipient"
fi

# Back to a fresh server.
curl -sf -X POST "$api/reset"
curl -sf "$api/messages" | grep -q '"messages": \[\]' || fail "reset left mail"
echo "examples/curl: all passed"
