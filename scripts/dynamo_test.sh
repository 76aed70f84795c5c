#!/usr/bin/env bash
# make test-dynamo: Triton behind NVIDIA Dynamo across two hosts, with etcd discovery.
# The two hosts are network namespaces joined by a veth pair (10.78.0.1 and 10.78.0.2):
#   host A: etcd, and the stack as `make dynamo-up` starts it with DYN_DISCOVERY_BACKEND=etcd
#           (Triton, Dynamo's frontend on 0.0.0.0:8787, a worker, the service, nginx)
#   host B: a second tritonserver and its Dynamo worker, registering through host A's etcd
# scripts/dynamo_checks.py then runs on host A: every model through the frontend, both hosts'
# workers taking requests, requests/s through Dynamo and straight to Triton at concurrency 16,
# and host B's worker killed under load. Needs root; touches only the namespaces it makes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${WORK:-$PWD/.cache/dynamo-test}
A=vlmdy-a B=vlmdy-b A_IP=10.78.0.1 B_IP=10.78.0.2
ETCD_URL=http://$A_IP:2379
say() { echo "dynamo-test: $*"; }
[ "$(id -u)" = 0 ] || { say "needs root (it makes network namespaces)"; exit 1; }
on() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@"; }

# etcd from Debian's etcd-server, unpacked rather than installed (the package would start a
# system service of its own)
ETCD=$(command -v etcd || true)
if [ -z "$ETCD" ]; then
  ETCD=$PWD/.cache/etcd/usr/bin/etcd
  if [ ! -x "$ETCD" ]; then
    say "fetching Debian's etcd-server (apt-get download, unpacked under .cache/etcd)"
    mkdir -p .cache/etcd
    (cd .cache/etcd && { apt-get download etcd-server >/dev/null 2>&1 || { apt-get update -qq && apt-get download etcd-server; }; } &&
      dpkg -x etcd-server_*.deb .)
  fi
fi

stack_env=(env DYNAMO=1 DYN_DISCOVERY_BACKEND=etcd ETCD_ENDPOINTS="$ETCD_URL" DYNAMO_HOST=0.0.0.0
  VLM_STACK_MODE=local VLM_SYSTEM_PACKAGES=skip STACK_RUN_DIR="$WORK/run-a" HF_HUB_OFFLINE=1
  VLM_MODELS_DIR="$PWD/.models/tiny" PYTHON="$PYTHON" DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS=1)

cleanup() {
  set +e
  [ -e "/run/netns/$A" ] && on "$A" "${stack_env[@]}" ./triton_start.sh down >/dev/null 2>&1
  for ns in "$A" "$B"; do  # everything left in our own namespaces is ours
    [ -e "/run/netns/$ns" ] || continue
    for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns"
  done
}
trap cleanup EXIT
cleanup
rm -rf "$WORK" && mkdir -p "$WORK/logs"

say "two hosts: $A ($A_IP) and $B ($B_IP)"
ip netns add "$A" && ip netns add "$B"
ip link add vlmdy0 netns "$A" type veth peer name vlmdy0 netns "$B"
ip -n "$A" addr add "$A_IP/24" dev vlmdy0 && ip -n "$B" addr add "$B_IP/24" dev vlmdy0
for ns in "$A" "$B"; do ip -n "$ns" link set lo up && ip -n "$ns" link set vlmdy0 up; done

say "host A: etcd on $ETCD_URL"
on "$A" "$ETCD" --data-dir "$WORK/etcd" --listen-client-urls "$ETCD_URL,http://127.0.0.1:2379" \
  --advertise-client-urls "$ETCD_URL" >"$WORK/logs/etcd.log" 2>&1 &
for _ in $(seq 1 60); do on "$A" curl -fsS "$ETCD_URL/health" >/dev/null 2>&1 && break; sleep 0.5; done
on "$A" curl -fsS "$ETCD_URL/health" >/dev/null || { say "etcd did not start"; tail "$WORK/logs/etcd.log"; exit 1; }

say "host B: tritonserver and its Dynamo worker"
on "$B" env HF_HUB_OFFLINE=1 VLM_MODELS_DIR="$PWD/.models/tiny" STREAM_GAP_MS=0 STACK_RUN_DIR="$WORK/run-b" \
  "$PYTHON" -m vlm_triton.serve >"$WORK/logs/triton-b.log" 2>&1 &
nsenter --net="/run/netns/$B" env DYN_DISCOVERY_BACKEND=etcd ETCD_ENDPOINTS="$ETCD_URL" DYN_SYSTEM_PORT=8789 \
  "$PYTHON" -m vlm_dynamo.worker --triton=127.0.0.1:8001 >"$WORK/logs/worker-b.log" 2>&1 &
worker_b=$!  # nsenter and env exec: this is the worker's own pid

say "host A: the stack with Dynamo (./triton_start.sh up, as make dynamo-up)"
started=$SECONDS
if ! on "$A" "${stack_env[@]}" STREAM_GAP_MS=0 ./triton_start.sh up >"$WORK/logs/stack-a.log" 2>&1; then
  say "the stack on host A did not come up:"; tail -30 "$WORK/logs/stack-a.log"; exit 1
fi
say "host A up in $((SECONDS - started)) s"
for _ in $(seq 1 300); do  # host B's worker registers once its Triton is ready
  on "$A" curl -fsS "http://$B_IP:8789/health" >/dev/null 2>&1 && break; sleep 1
done
on "$A" curl -fsS "http://$B_IP:8789/health" >/dev/null 2>&1 || { say "host B's worker did not come up"; tail -20 "$WORK/logs/worker-b.log"; exit 1; }
say "host B's worker answers"

status=0
on "$A" "$PYTHON" scripts/dynamo_checks.py --frontend 127.0.0.1:8787 --triton 127.0.0.1:8001 \
  --worker-a 127.0.0.1:8789 --worker-b "$B_IP:8789" --kill-pid "$worker_b" | tee "$WORK/checks.log" || status=$?
grep -E '^(RESULT|FIGURE)' "$WORK/checks.log" || true

# `status` and `down` without DYNAMO=1 still see the Dynamo programs: they ask supervisord
plain_env=(env VLM_STACK_MODE=local VLM_SYSTEM_PACKAGES=skip STACK_RUN_DIR="$WORK/run-a" HF_HUB_OFFLINE=1
  VLM_MODELS_DIR="$PWD/.models/tiny" PYTHON="$PYTHON")
on "$A" "${plain_env[@]}" ./triton_start.sh status >"$WORK/logs/status-a.log" 2>&1 || true
frontend=$(awk '$1 == "dynamo-frontend" && /not in these settings/ {print $4}' "$WORK/logs/status-a.log")
on "$A" "${plain_env[@]}" ./triton_start.sh down >"$WORK/logs/down-a.log" 2>&1 || true
if [ -z "$frontend" ] || ! grep -q "dynamo-frontend stopped" "$WORK/logs/down-a.log" || kill -0 "$frontend" 2>/dev/null; then
  say "FAILED: status/down without DYNAMO=1 (frontend pid '${frontend}')"; cat "$WORK/logs/status-a.log" "$WORK/logs/down-a.log"
  status=1
else
  say "RESULT status without DYNAMO=1 lists dynamo-frontend (pid $frontend); down stops it"
fi
[ "$status" = 0 ] && say "passed" || { say "FAILED (logs in $WORK/logs and $WORK/run-a/logs)"; tail -20 "$WORK/logs/worker-b.log"; }
exit "$status"
