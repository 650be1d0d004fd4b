#!/usr/bin/env bash
# Demo: installs what is missing, builds, starts three local smtp-sink backends (one
# broken: it rejects EHLO) and smtplb in front of them with conf/demo.toml, sends one
# message through it with swaks, and keeps running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scripts/deps.sh demo
scripts/build.sh

demo=$root/build/demo
mkdir -p "$demo"
log=$demo/smtplb.log
: > "$log"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

for p in 2525 2601 2602 2603 9925; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "demo: port $p is in use; stop what listens there first" >&2; exit 1
  fi
done
user_opt=(); [ "$(id -u)" -eq 0 ] && user_opt=(-u nobody)
smtp-sink "${user_opt[@]}" 127.0.0.1:2601 100 & pids+=($!)
smtp-sink "${user_opt[@]}" 127.0.0.1:2602 100 & pids+=($!)
smtp-sink "${user_opt[@]}" -f EHLO 127.0.0.1:2603 100 & pids+=($!)

build/smtplb -f conf/demo.toml 2>>"$log" & lb=$!; pids+=("$lb")
for _ in $(seq 100); do
  grep -q "is UP" "$log" && break
  kill -0 "$lb" 2>/dev/null || { cat "$log"; echo "demo: smtplb exited" >&2; exit 1; }
  sleep 0.1
done
sleep 0.5
cat "$log"
echo
echo "demo: sending one message through smtplb with swaks ..."
swaks --server 127.0.0.1:2525 --from demo@example.org --to postmaster@example.net \
  --header "Subject: smtplb demo" --body "Hello through smtplb" --hide-informational
echo
cat <<MSG
demo: smtplb is running on 127.0.0.1:2525 in front of smtp-sink on ports 2601 and 2602
      (port 2603 rejects EHLO, so its health check fails and it takes no sessions).
      log file:   $log   (one access line per session; health transitions)
      config:     $root/conf/demo.toml
      try:        swaks --server 127.0.0.1:2525 --to you@example.net
                  smtp-source -s 10 -m 100 127.0.0.1:2525
                  build/smtplb ctl --socket /tmp/smtplb-demo.sock status
                  build/smtplb ctl --socket /tmp/smtplb-demo.sock drain sinks/sink1
                  curl -s http://127.0.0.1:9925/metrics | grep smtplb_server_connections_total
                  kill -HUP $lb    (reloads conf/demo.toml in place)
      Ctrl-C stops smtplb and the backends. Following the log:
MSG
# In the background so that a signal to this script alone (not just Ctrl-C to the whole
# terminal group) still runs the clean-up at once.
tail -n 0 -f --pid="$lb" "$log" & pids+=($!)
wait "$lb" || true
