#!/usr/bin/env bash
# Demo: installs what is missing, builds smtplb, starts three local smtp-sink backends (one
# broken: it rejects EHLO) and smtplb in front of them with conf/demo.toml, sends one
# message through it with swaks, shows that session's access line, and keeps running with
# the log on screen until Ctrl-C (or SIGTERM). Runs as root or as a user with sudo (for
# the packages); the backends run as that user (as nobody for root).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scripts/deps.sh demo
# Only the binary: the tests are not needed to watch it work.
TARGET=smtplb scripts/build.sh

# Postfix's tools live in /usr/sbin, which is not on a normal user's PATH.
sink=/usr/sbin/smtp-sink source=/usr/sbin/smtp-source
demo=$root/build/demo
mkdir -p "$demo"
log=$demo/smtplb.log
: >"$log"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM
fail() { echo "demo: $*" >&2; exit 1; }

for p in 2525 2601 2602 2603 9925; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    fail "port $p is in use; stop what listens there first"
  fi
done

# The backends, each with its own log, and checked: a backend that did not start would
# only show up later as servers DOWN and a 421 for the message.
user_opt=(); [ "$(id -u)" -eq 0 ] && user_opt=(-u nobody)
declare -A sink_pid
start_sink() { # NAME PORT [smtp-sink options]
  local name=$1 port=$2; shift 2
  "$sink" "${user_opt[@]}" "$@" "127.0.0.1:$port" 100 >"$demo/$name.log" 2>&1 &
  pids+=($!); sink_pid[$name]=$!
}
start_sink sink1 2601
start_sink sink2 2602
start_sink broken 2603 -f EHLO
for name in sink1 sink2 broken; do
  case $name in sink1) port=2601 ;; sink2) port=2602 ;; broken) port=2603 ;; esac
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue 2
    kill -0 "${sink_pid[$name]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "demo: the backend $name (smtp-sink on 127.0.0.1:$port) did not start:" >&2
  sed 's/^/      /' "$demo/$name.log" >&2
  exit 1
done

build/smtplb -f conf/demo.toml 2>>"$log" &
lb=$!; pids+=("$lb")
# Up to 10 s for the two good backends' first health checks.
for _ in $(seq 100); do
  grep -q "server sinks/sink1 is UP" "$log" && grep -q "server sinks/sink2 is UP" "$log" && break
  kill -0 "$lb" 2>/dev/null || { cat "$log"; fail "smtplb exited (its log is above)"; }
  sleep 0.1
done
cat "$log"
grep -q "server sinks/sink1 is UP" "$log" && grep -q "server sinks/sink2 is UP" "$log" \
  || fail "sink1 and sink2 are not UP after 10 s (smtplb's log is above)"

echo
echo "demo: sending one message through smtplb with swaks ..."
offset=$(stat -c %s "$log")
swaks --server 127.0.0.1:2525 --from demo@example.org --to postmaster@example.net \
  --header "Subject: smtplb demo" --body "Hello through smtplb" --hide-informational \
  || fail "swaks could not send the message (its dialogue is above)"
# The session's access line comes from the log writer within about 10 ms of its end:
# shown with the log lines before it, and the log is followed from just after it.
access='listener=demo pool=sinks .* term='
upto=""
for _ in $(seq 50); do
  upto=$(tail -c +$((offset + 1)) "$log" | sed -n "1,/$access/p")
  grep -q "$access" <<<"$upto" && break
  upto=""
  sleep 0.1
done
[ -n "$upto" ] || fail "no access line for the message in $log after 5 s"
echo
echo "demo: smtplb's access line for that session (fields: docs/logging.md):"
echo "$upto"
echo
offset=$((offset + $(printf '%s\n' "$upto" | wc -c)))
cat <<MSG
demo: smtplb is running on 127.0.0.1:2525 in front of smtp-sink on ports 2601 and 2602
      (port 2603 rejects EHLO, so its health check fails and it takes no sessions).
      log file:   $log   (one access line per session; health transitions)
      config:     $root/conf/demo.toml
      try:        swaks --server 127.0.0.1:2525 --to you@example.net
                  $source -s 10 -m 100 127.0.0.1:2525
                  build/smtplb ctl --socket /tmp/smtplb-demo.sock status
                  build/smtplb ctl --socket /tmp/smtplb-demo.sock drain sinks/sink1
                  curl -s http://127.0.0.1:9925/metrics | grep smtplb_server_connections_total
                  kill -HUP $lb    (reloads conf/demo.toml in place)
      Ctrl-C stops smtplb and the backends. Following the log:
MSG
# From where the lines above ended. In the background so that a signal to this script
# alone (not just Ctrl-C to the whole terminal group) still runs the clean-up at once.
tail -c +$((offset + 1)) -f --pid="$lb" "$log" &
pids+=($!)
wait "$lb" || true
