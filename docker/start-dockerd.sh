#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine; start one if it does not.
#
#   docker/start-dockerd.sh          # idempotent: install docker.io if missing, start dockerd
#                                    # in the background if nothing answers, wait until it does
#
# Needs root (CI and the dev machines run as root). Prints one line saying what it did.
# Env: DOCKERD_LOG (default /var/log/edgeship-dockerd.log), DOCKERD_WAIT_S (default 60).
set -euo pipefail

log=${DOCKERD_LOG:-/var/log/edgeship-dockerd.log}
wait_s=${DOCKERD_WAIT_S:-60}

answers() { docker info >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && answers; then
  echo "start-dockerd: engine already answering ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "start-dockerd: no Docker engine answers and this is not root; start one yourself" >&2
  exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
  echo "start-dockerd: installing docker.io" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
fi

# A stale pidfile from a dead daemon makes dockerd refuse to start.
pidfile=/var/run/docker.pid
if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  rm -f "$pidfile"
fi

if [ ! -f "$pidfile" ]; then
  # setsid + nohup: the daemon outlives this script and the shell that called it.
  setsid nohup dockerd --storage-driver=overlay2 >>"$log" 2>&1 </dev/null &
  echo "start-dockerd: started dockerd (pid $!), log in $log" >&2
fi

for _ in $(seq "$wait_s"); do
  if answers; then
    echo "start-dockerd: engine answering ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
    exit 0
  fi
  sleep 1
done
echo "start-dockerd: dockerd did not answer within ${wait_s}s; last log lines:" >&2
tail -n 20 "$log" >&2 || true
exit 1
