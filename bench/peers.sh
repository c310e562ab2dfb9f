#!/bin/bash
# bench/peers.sh -- the throughput table: Mailbox beside its peers, in one run.
#
#   bench/peers.sh                 every row, ROUNDS=3
#   ROWS="smtp pop3" bench/peers.sh
#
# The peers are the anchors kit's private Postfix, aiosmtpd and Dovecot
# (ANCHORS, default ../shared/anchors; its README says how to install them).
# Mailbox is this tree (twistd from the venv, the tree first on PYTHONPATH),
# with `workers = WORKERS` (default auto). Everything listens on 127.0.0.1.
# Within a row the targets take turns, one run each per round, so a machine
# that slows down hits them alike: compare the ratios, not absolute figures.
#
# Rows (ROWS, default all):
#   smtp      anchors' run_smtp.sh: 5000 x 2 KB over 20 sessions, one message a
#             connection (conn) and connections reused (reuse); Postfix,
#             aiosmtpd and Mailbox, each delivering to a Maildir with fsync.
#   pop3      pop3bench.py from the kit on one Maildir both servers read: a
#             session with STAT+UIDL+LIST of 10,000 messages, and RETR of
#             2,000 x 2 KB, warm (after a first session each); Dovecot, Mailbox.
#   outbound  bench/queue_throughput.py -r 1 (Mailbox relays 2,000 messages
#             to an smtp-sink) and bench/postfix_relay.sh 2000 1, in turns.
#   burst     bench/connect_burst.py -r 3: 1,000 connections at once.
#
# The last lines are the table: median [min-max] of each target, the ratio
# of the medians, the goal, and whether it is met.
set -u
ROUNDS=${ROUNDS:-3}; WORKERS=${WORKERS:-auto}; ROWS=${ROWS:-smtp pop3 outbound burst}
HERE=$(cd "$(dirname "$0")" && pwd); TREE=$(dirname "$HERE")
PYTHON=${PYTHON:-$TREE/.venv/bin/python}; TWISTD=$(dirname "$PYTHON")/twistd
ANCHORS=${ANCHORS:-$(cd "$TREE/../shared/anchors" 2>/dev/null && pwd)}
[ -n "$ANCHORS" ] && [ -f "$ANCHORS/anchors/common.sh" ] || {
    echo "no anchors kit at ANCHORS=$ANCHORS" >&2; exit 2; }
for f in common postfix aiosmtpd dovecot; do source "$ANCHORS/anchors/$f.sh"; done
OUT=$(mktemp -d /tmp/mailbox-peers.XXXXXX)
RESULTS=$OUT/results  # lines: row target value
PB="python3 $ANCHORS/tools/pop3bench.py"
want() { [[ " $ROWS " == *" $1 "* ]]; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

MBX_PID=""
mbx_start() {  # mail_dir: a Mailbox with joe@example.test / secret, SMTP and POP3
    local home=$OUT/mailbox
    rm -rf "$home"; mkdir -p "$home/etc"
    "$PYTHON" -c "import bcrypt; print('joe@example.test:' + bcrypt.hashpw(b'secret', bcrypt.gensalt(5)).decode())" \
        > "$home/etc/accounts"
    : > "$home/etc/aliases"
    MBX_SMTP=$(free_port); MBX_POP3=$(free_port)
    cat > "$home/etc/mailbox.ini" <<INI
[mailbox]
hostname = mail.example.test
domains = example.test
mail_dir = $1
workers = $WORKERS
trusted_networks =
[smtp]
listen = tcp:$MBX_SMTP:interface=127.0.0.1
submission =
[pop3]
listen = tcp:$MBX_POP3:interface=127.0.0.1
[relay]
pop_before_smtp_ttl = 0
[inbound]
checks = no
INI
    (cd "$home" && PYTHONPATH=$TREE exec "$TWISTD" -n --pidfile= mailbox --config etc/mailbox.ini \
        > "$home/log" 2>&1) &
    MBX_PID=$!
    wait_port 127.0.0.1 "$MBX_SMTP" 200 && wait_port 127.0.0.1 "$MBX_POP3" 200 || {
        tail -5 "$home/log" >&2; exit 1; }
    sleep 1  # the other workers
}
mbx_stop() {
    [ -n "$MBX_PID" ] || return 0
    kill "$MBX_PID" 2>/dev/null; wait "$MBX_PID" 2>/dev/null; MBX_PID=""
}
cleanup() { mbx_stop; postfix_stop > /dev/null 2>&1; aiosmtpd_stop 2527 > /dev/null 2>&1; dovecot_stop > /dev/null 2>&1; }
trap cleanup EXIT

record() { echo "$1 $2 $3" | tee -a "$RESULTS"; }
field() { grep -o "$1=[0-9.]*" | head -1 | cut -d= -f2; }

if want smtp; then
    postfix_start > /dev/null || exit 1
    aiosmtpd_start 2527 > /dev/null || exit 1
    mbx_start "$OUT/mail"
    mkdir -p "$OUT/mail/example.test/joe/"{new,cur,tmp}
    # Nothing is deleted while the SMTP rows run (CLEAN=0: each run counts
    # what arrived on top of what is there). On ext4 without a journal (these
    # machines' disks), making a file soon after many were deleted costs a
    # look at each recently deleted inode (the kernel's recently_deleted(),
    # about 30-60 s): deleting the last run's 5000 files before each run made
    # every server's next run up to a third slower, by how many files it
    # makes a message and where they land. So the Maildirs are emptied
    # once, here, and the rounds start after that window.
    find "$JOE_MAILDIR/new" "$JOE_MAILDIR/cur" -maxdepth 1 -type f -delete 2> /dev/null
    sync; sleep "${SETTLE:-60}"
    for _ in $(seq "$ROUNDS"); do
        for target in "postfix 127.0.0.1:2526 $JOE_MAILDIR" "aiosmtpd 127.0.0.1:2527 $JOE_MAILDIR" \
                "mailbox 127.0.0.1:$MBX_SMTP $OUT/mail/example.test/joe"; do
            set -- $target
            for mode in conn reuse; do
                out=$(CLEAN=0 MODES=$mode NAME=$1 "$ANCHORS/run_smtp.sh" "$2" "$3")
                record "smtp-$mode" "$1" "$(field msgs_per_s <<< "$out")"
                # The whole machine's CPU a message, smtp-source's own left out.
                record "cpu-smtp-$mode" "$1" "$(field srv_cpu_ms_per_msg <<< "$out")"
            done
        done
    done
    mbx_stop; postfix_stop > /dev/null; aiosmtpd_stop 2527 > /dev/null
    rm -rf "$OUT/mail"
fi

if want pop3; then
    BCRYPT_COST=5 dovecot_start > /dev/null 2>&1 || { echo "dovecot does not start" >&2; exit 1; }
    mbx_start "$VMAIL"
    for test in list retr; do
        n=10000; args=(); [ "$test" = retr ] && { n=2000; args=(--max 2000); }
        $PB fill "$JOE_MAILDIR" "$n" --size 2048 > /dev/null && chown -R "$VMAIL_UID:$VMAIL_GID" "$VMAIL"
        sync; sleep 1
        for port in 1111 "$MBX_POP3"; do  # the first session after the fill, not timed
            $PB "$test" "127.0.0.1:$port" joe@example.test secret "${args[@]}" > /dev/null
        done
        sleep 2.5  # Mailbox keeps a listing only of a Maildir that has settled
        $PB "$test" "127.0.0.1:$MBX_POP3" joe@example.test secret "${args[@]}" > /dev/null
        key=session_s; [ "$test" = retr ] && key=msgs_per_s
        for _ in $(seq $((ROUNDS * 3))); do
            record "pop3-$test" dovecot \
                "$($PB "$test" 127.0.0.1:1111 joe@example.test secret "${args[@]}" | field $key)"
            record "pop3-$test" mailbox \
                "$($PB "$test" "127.0.0.1:$MBX_POP3" joe@example.test secret "${args[@]}" | field $key)"
        done
    done
    mbx_stop; dovecot_stop > /dev/null 2>&1
fi

if want outbound; then
    for _ in $(seq "$ROUNDS"); do
        rate=$("$PYTHON" "$HERE/queue_throughput.py" -r 1 -w "$WORKERS" | grep -o "^messages/second: median [0-9.]*" | cut -d' ' -f3)
        record outbound mailbox "$rate"
        rate=$(ANCHORS=$ANCHORS "$HERE/postfix_relay.sh" 2000 1 | grep -o "median [0-9.]*" | cut -d' ' -f2)
        record outbound postfix "$rate"
    done
fi

if want burst; then
    t=$("$PYTHON" "$HERE/connect_burst.py" -r 3 | grep -o "^median [0-9.]*" | cut -d' ' -f2)
    record burst mailbox "$t"
fi

echo
echo "workers = $WORKERS, $ROUNDS rounds, $(nproc) cores; results in $RESULTS"
python3 - "$RESULTS" <<'PY'
import collections, statistics, sys

values = collections.defaultdict(list)
for line in open(sys.argv[1]):
    row, target, value = line.split()
    if value:
        values[row, target].append(float(value))

def median(row, target):
    v = values.get((row, target))
    return statistics.median(v) if v else None

def shown(row, target, unit=""):
    v = values.get((row, target))
    if not v:
        return "-"
    return f"{statistics.median(v):g}{unit} [{min(v):g}-{max(v):g}]"

# row, what is measured, peers, how Mailbox's figure compares: (peer, goal, higher is better)
ROWS = [
    ("smtp-conn", "SMTP, one message a connection, msgs/s", [("postfix", 1.5, True), ("aiosmtpd", 1.2, True)]),
    ("smtp-reuse", "SMTP, connections reused, msgs/s", [("postfix", 1.5, True), ("aiosmtpd", 1.2, True)]),
    ("pop3-list", "POP3 STAT+UIDL+LIST of 10,000, s", [("dovecot", 1.2, False)]),
    ("pop3-retr", "POP3 RETR of 2,000 x 2 KB, msgs/s", [("dovecot", 1.0, True)]),
    ("outbound", "relay 2,000 messages to smtp-sink, msgs/s", [("postfix", 1.0, True)]),
]
print("| work | Mailbox | peers | ratio | goal | met |")
print("|---|---|---|---|---|---|")
for row, what, peers in ROWS:
    ours = median(row, "mailbox")
    if ours is None:
        continue
    for peer, goal, higher in peers:
        theirs = median(row, peer)
        if theirs is None:
            continue
        ratio = ours / theirs
        met = ratio >= goal if higher else ratio <= goal
        sign = ">=" if higher else "<="
        print(f"| {what} | {shown(row, 'mailbox')} | {peer} {shown(row, peer)} "
              f"| {ratio:.2f}x | {sign} {goal}x | {'yes' if met else 'no'} |")
burst = median("burst", "mailbox")
if burst is not None:
    print(f"| 1,000 connections at once, s | {shown('burst', 'mailbox')} | - | - | < 2 s "
          f"| {'yes' if burst < 2 else 'no'} |")
for mode in ("conn", "reuse"):
    cpu = [f"{t} {median('cpu-smtp-' + mode, t):.2f}" for t in ("mailbox", "postfix", "aiosmtpd")
           if median("cpu-smtp-" + mode, t) is not None]
    if cpu:
        print(f"\nSMTP {mode}: server CPU ms a message (median): " + ", ".join(cpu))
PY
