#!/bin/bash
# Postfix relaying the load of bench/queue_throughput.py to smtp-sink, for comparison.
#   bench/postfix_relay.sh [MESSAGES] [RUNS]       (defaults 2000 and 3)
# Uses the anchors kit's private Postfix (ANCHORS, default ../shared/anchors; its
# README says how to install Postfix), changed to relay everything to an
# smtp-sink on 127.0.0.1 through relayhost. smtp-source sends from 127.0.0.1
# (in mynetworks) to user@far.test; a run is timed from the first message in
# Postfix's queue until the queue is empty, as queue_throughput.py times Mailbox.
set -u
N=${1:-2000}; RUNS=${2:-3}
ANCHORS=${ANCHORS:-$(cd "$(dirname "$0")/../../shared/anchors" 2>/dev/null && pwd)}
[ -n "$ANCHORS" ] && [ -f "$ANCHORS/anchors/postfix.sh" ] || { echo "no anchors kit at ANCHORS=$ANCHORS" >&2; exit 2; }
source "$ANCHORS/anchors/postfix.sh"
SINK_PORT=${SINK_PORT:-2538}
trap 'postfix_stop; kill $SINK 2>/dev/null' EXIT
postfix_start || exit 1
postconf -c "$PF/etc" -e "relayhost=[127.0.0.1]:$SINK_PORT" "default_transport=smtp" \
    "relay_transport=relay" "smtp_tls_security_level=none"
postfix -c "$PF/etc" reload < /dev/null > /dev/null 2>&1
user=(); [ "$(id -u)" = 0 ] && user=(-u nobody)
smtp-sink -c "${user[@]}" "127.0.0.1:$SINK_PORT" 100 > /dev/null 2>&1 & SINK=$!
wait_port 127.0.0.1 "$SINK_PORT"
queued() { find "$PF/queue/incoming" "$PF/queue/active" "$PF/queue/deferred" "$PF/queue/maildrop" -type f 2>/dev/null | wc -l; }
rates=()
for r in $(seq "$RUNS"); do
    t0=$(date +%s.%N)
    smtp-source -s 10 -m "$N" -l 1024 -f sender@example.test -t user@far.test "127.0.0.1:$PF_PORT" &
    SRC=$!
    first=""
    while kill -0 $SRC 2>/dev/null; do
        [ -z "$first" ] && [ "$(queued)" -gt 0 ] && first=$(date +%s.%N)
        sleep 0.005
    done
    wait $SRC
    sent=$(date +%s.%N)
    while [ "$(queued)" -gt 0 ]; do sleep 0.01; done
    end=$(date +%s.%N)
    [ -z "$first" ] && first=$t0
    rate=$(echo "$N / ($end - $first)" | bc -l)
    rates+=("$rate")
    printf 'run %d: %.1f msg/s (%.2f s to an empty queue; smtp-source done after %.2f s)\n' \
        "$r" "$rate" "$(echo "$end - $first" | bc -l)" "$(echo "$sent - $t0" | bc -l)"
done
deferred=$(grep -c "status=deferred\|status=bounced" "$PF/maillog")
printf '%s\n' "${rates[@]}" | sort -n | awk '{a[NR]=$1} END {printf "postfix relay: median %.1f msg/s (min %.1f, max %.1f)\n", a[int((NR+1)/2)], a[1], a[NR]}'
echo "deferred or bounced: $deferred"
