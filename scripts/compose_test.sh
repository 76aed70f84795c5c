#!/usr/bin/env bash
# The Compose stack for real, offline, on a Debian 12 machine without a registry:
#   1. installs what is missing: docker.io containerd runc iptables debootstrap (apt), and
#      Compose v2 + buildx from Debian trixie's .debs (apt-get download + dpkg -x into
#      $DOCKER_CONFIG/cli-plugins; nothing is installed system-wide for them);
#   2. starts its own dockerd (own data root, exec root and socket under $COMPOSE_TEST_WORK)
#      and stops it by PID at the end, also on failure;
#   3. builds a Debian bookworm base image with debootstrap (tarball cached in .cache/);
#   4. prepares the wheelhouse docker/wheelhouse/py3.11 with pip download (pins from
#      pyproject.toml; the CPU torch from pip's find-links, /opt/wheels);
#   5. builds every image offline, validates docker-compose.yml and docker-compose-cpu.yml,
#      brings the CPU stack up (tiny checkpoints) with `up --wait`, checks it through nginx
#      (smoke checks, then tests/e2e), and takes it down with `down -v`.
# Run as root. Progress lines carry the time and the seconds since the start; the figures
# (build times, image sizes, up time) are summed up at the end. Exit status: 0 = all passed.
#
# Environment (defaults):
#   NGINX_PORT=18090 NGINX_GRPC_PORT=18091 PROMETHEUS_PORT=19090   host ports (127.0.0.1)
#   COMPOSE_TEST_WORK=/var/tmp/vlm-serve-compose-test   dockerd state; kept between runs
#                                                       (image and build cache)
#   COMPOSE_TEST_CLEAN=1     wipe that state first (a cold run)
#   BASE_IMAGE=vlm-serve/debian:bookworm   built here by debootstrap when missing; any other
#                                          name is pulled instead
#   DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR  default: the host's apt sources
#   TORCH_FIND_LINKS=/opt/wheels   where the CPU torch wheel is (else TORCH_INDEX_URL)
#   UP_TIMEOUT=300           seconds `up --wait` may take
#   BUILD_CACHE_KEEP=4gb     BuildKit cache kept in the work folder between runs
#   PYTHON=python3           the project's Python (tests, tiny checkpoints)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)

NGINX_PORT=${NGINX_PORT:-18090}
NGINX_GRPC_PORT=${NGINX_GRPC_PORT:-18091}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-19090}
WORK=${COMPOSE_TEST_WORK:-/var/tmp/vlm-serve-compose-test}
CACHE=$ROOT/.cache/compose-test
LOCAL_BASE=vlm-serve/debian:bookworm
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-/opt/wheels}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
PYTRITON_VERSION=${PYTRITON_VERSION:-0.7.0}
UP_TIMEOUT=${UP_TIMEOUT:-300}
PYTHON=${PYTHON:-python3}
WHEELHOUSE=$ROOT/docker/wheelhouse/py3.11
COMPOSE_FILE_CPU=docker-compose-cpu.yml
SERVICES=(triton fastapi nginx nginx-exporter prometheus)

export DOCKER_HOST=unix://$WORK/docker.sock
export DOCKER_CONFIG=$WORK/docker-config
export DOCKER_BUILDKIT=1 COMPOSE_PROJECT_NAME=vlm-serve-test BUILDKIT_PROGRESS=plain
export NGINX_PORT NGINX_GRPC_PORT PROMETHEUS_PORT BASE_IMAGE
export NGINX_BIND=127.0.0.1 HF_HUB_OFFLINE=1
export STREAM_GAP_MS=0  # every token its own event: tests/e2e checks that nginx passes each on at once
# The stack under test serves the tiny checkpoints, whatever VLM_MODELS_DIR the caller has.
export VLM_MODELS_DIR=/models/tiny
# The tests drive the gateway hard from one address: the per-client limits out of their way
# (tests/e2e/test_access.py checks them in a local stack with small ones).
export NGINX_RATE=10000 NGINX_BURST=10000 NGINX_CONNECTIONS=10000
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
COMPOSE=(docker compose -f "$COMPOSE_FILE_CPU")

SUMMARY=()
DOCKERD_PID=
STACK_UP=0

log() { printf '[%s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - T0))" "$*"; }
fail() { log "FAILED: $*"; exit 1; }
note() { SUMMARY+=("$*"); log "$*"; }

# --- dockerd ------------------------------------------------------------------------------
our_dockerd() {  # is PID a dockerd of this work folder (not an unrelated reused PID)?
  [ -n "${1:-}" ] && [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q "dockerd.*$WORK/data"
}

stop_dockerd() {
  local pid=${1:-$DOCKERD_PID}
  our_dockerd "$pid" || return 0
  log "stopping dockerd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    our_dockerd "$pid" || break
    sleep 0.5
  done
  if our_dockerd "$pid"; then
    log "dockerd did not stop in 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

start_dockerd() {
  mkdir -p "$WORK/data" "$WORK/exec"
  if [ -f "$WORK/dockerd.pid" ] && our_dockerd "$(cat "$WORK/dockerd.pid")"; then
    log "a dockerd of an earlier run is still up: stopping it"
    stop_dockerd "$(cat "$WORK/dockerd.pid")"
  fi
  rm -f "$WORK/docker.sock" "$WORK/dockerd.pid"
  dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" -H "unix://$WORK/docker.sock" \
    --pidfile "$WORK/dockerd.pid" --storage-driver overlay2 >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 120); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log"; fail "dockerd exited"; }
    sleep 0.5
  done
  docker version >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; fail "dockerd not answering"; }
  log "dockerd $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})') pid $DOCKERD_PID, socket $WORK/docker.sock"
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ "$STACK_UP" = 1 ]; then
    if [ "$rc" != 0 ]; then
      log "diagnostics: docker compose ps / logs"
      "${COMPOSE[@]}" ps -a
      "${COMPOSE[@]}" logs --no-color --tail=60
    fi
    log "docker compose down -v"
    timeout 180 "${COMPOSE[@]}" down -v --remove-orphans --timeout 20 2>&1 | tail -3
  fi
  stop_dockerd
  local left
  if command -v pgrep >/dev/null; then
    left=$(pgrep -f "$WORK/" | tr '\n' ' ')
    [ -z "$left" ] || log "WARNING: processes still using $WORK: $left"
  fi
  if [ "${#SUMMARY[@]}" -gt 0 ]; then
    echo "== summary"
    printf '   %s\n' "${SUMMARY[@]}"
  fi
  log "compose test $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)") in $(($(date +%s) - T0)) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- apt mirrors of this host -------------------------------------------------------------
host_mirror() {  # $1: "security" or "main"
  local uris
  uris=$( (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
           grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
             sed -E 's/\[[^]]*\]//' | awk '{print $2}') | grep -E '^https?://')
  if [ "$1" = security ]; then
    echo "$uris" | grep -m1 security || echo http://deb.debian.org/debian-security
  else
    echo "$uris" | grep -v security | grep -m1 . || echo http://deb.debian.org/debian
  fi
}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(host_mirror main)}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(host_mirror security)}

# --- 1. tools -----------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || fail "run as root (it starts dockerd and runs debootstrap)"
log "compose test: nginx on 127.0.0.1:$NGINX_PORT (gRPC $NGINX_GRPC_PORT), Prometheus 127.0.0.1:$PROMETHEUS_PORT; work folder $WORK"
missing=()
for pair in dockerd:docker.io containerd:containerd runc:runc iptables:iptables debootstrap:debootstrap curl:curl; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v docker >/dev/null || fail "no docker CLI (the docker.io package brings one)"

plugins=$DOCKER_CONFIG/cli-plugins
if [ ! -x "$plugins/docker-compose" ] || [ ! -x "$plugins/docker-buildx" ]; then
  debs=$CACHE/debs
  if ! ls "$debs"/docker-compose_*.deb "$debs"/docker-buildx_*.deb >/dev/null 2>&1; then
    log "fetching Compose v2 and buildx from Debian trixie ($DEBIAN_MIRROR)"
    apt_dir=$WORK/apt-trixie
    rm -rf "$apt_dir" && mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/prefs.d" "$debs"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR trixie main" >"$apt_dir/sources.list"
    cat >"$apt_dir/apt.conf" <<EOF
Dir::Etc::SourceList "$apt_dir/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "$apt_dir/preferences";
Dir::Etc::PreferencesParts "$apt_dir/prefs.d";
Dir::State::Lists "$apt_dir/lists";
Dir::State::status "/dev/null";
Dir::Cache "$apt_dir/cache";
Acquire::Languages "none";
APT::Sandbox::User "root";
EOF
    APT_CONFIG=$apt_dir/apt.conf apt-get update -qq
    (cd "$debs" && APT_CONFIG=$apt_dir/apt.conf apt-get download -qq docker-compose docker-buildx)
    rm -rf "$apt_dir"
  fi
  rm -rf "$WORK/plugins-x" && mkdir -p "$plugins"
  for deb in "$debs"/docker-compose_*.deb "$debs"/docker-buildx_*.deb; do dpkg -x "$deb" "$WORK/plugins-x"; done
  cp "$WORK/plugins-x/usr/libexec/docker/cli-plugins/docker-compose" \
    "$WORK/plugins-x/usr/libexec/docker/cli-plugins/docker-buildx" "$plugins/"
  rm -rf "$WORK/plugins-x"
fi
log "docker CLI $(docker version --format '{{.Client.Version}}' 2>/dev/null || true), $(docker compose version), buildx $(docker buildx version | awk '{print $2}')"

# --- 2. dockerd ---------------------------------------------------------------------------
if [ "${COMPOSE_TEST_CLEAN:-0}" = 1 ] && [ -d "$WORK" ]; then
  log "COMPOSE_TEST_CLEAN=1: removing $WORK (images, build cache)"
  [ -f "$WORK/dockerd.pid" ] && stop_dockerd "$(cat "$WORK/dockerd.pid")"
  rm -rf "$WORK/data" "$WORK/exec"
fi
start_dockerd

# --- 3. base image ------------------------------------------------------------------------
build_base_tarball() {  # a minbase bookworm shaped like debian:bookworm-slim
  local rootfs=$WORK/rootfs tarball=$1
  rm -rf "$rootfs"
  log "debootstrap --variant=minbase bookworm ($DEBIAN_MIRROR)"
  debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb $DEBIAN_SECURITY_MIRROR bookworm-security main
EOF
  # As in Debian's official images: no services started by package scripts, no docs,
  # man pages or translations, no package cache.
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" && chmod +x "$rootfs/usr/sbin/policy-rc.d"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda,locale}/* \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/*.log "$rootfs/etc/hostname"
  : >"$rootfs/etc/machine-id"
  mkdir -p "$(dirname "$tarball")"
  tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  rm -rf "$rootfs"
}

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  log "base image $BASE_IMAGE: present"
elif [ "$BASE_IMAGE" != "$LOCAL_BASE" ]; then
  log "docker pull $BASE_IMAGE"
  docker pull "$BASE_IMAGE"
else
  start=$(date +%s)
  tarball=$CACHE/debian-bookworm-minbase.tar
  # Rebuilt after 30 days (the images' apt-get update brings newer packages anyway).
  if [ -s "$tarball" ] && [ -z "$(find "$tarball" -mtime +30)" ]; then
    log "base image from the cached $tarball"
  else
    build_base_tarball "$tarball"
  fi
  docker import --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tarball" "$BASE_IMAGE" >/dev/null
  note "base image $BASE_IMAGE: $(($(date +%s) - start)) s, $(($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE") / 1000000)) MB"
fi

# --- 4. wheelhouse ------------------------------------------------------------------------
requirements=$("$PYTHON" docker/pinned.py triton fastapi)
stamp=$(printf '%s\nnvidia-pytriton==%s\n' "$requirements" "$PYTRITON_VERSION")
if [ -f "$WHEELHOUSE/.complete" ] && [ "$(cat "$WHEELHOUSE/.complete")" = "$stamp" ]; then
  log "wheelhouse $WHEELHOUSE: up to date ($(ls "$WHEELHOUSE"/*.whl | wc -l) wheels)"
else
  start=$(date +%s)
  log "wheelhouse: pip download into $WHEELHOUSE"
  rm -rf "$WHEELHOUSE" && mkdir -p "$WHEELHOUSE"
  # Wheels for the images' Python (Debian bookworm: CPython 3.11, glibc 2.36), whatever
  # Python runs this script.
  target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --platform manylinux2014_x86_64)
  for minor in $(seq 17 36); do target+=(--platform "manylinux_2_${minor}_x86_64"); done
  torch=$(echo "$requirements" | grep '^torch==')
  # torch first and on its own: the CPU build, never PyPI's CUDA one (GBs of nvidia-* wheels).
  if [ -d "$TORCH_FIND_LINKS" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-index --find-links "$TORCH_FIND_LINKS" "${target[@]}" \
      -d "$WHEELHOUSE" "$torch" || fail "no CPU $torch wheel in $TORCH_FIND_LINKS"
  else
    "$PYTHON" -m pip download --quiet --no-deps --index-url "$TORCH_INDEX_URL" "${target[@]}" \
      -d "$WHEELHOUSE" "$torch" || fail "no CPU $torch from $TORCH_INDEX_URL"
  fi
  ls "$WHEELHOUSE"/torch-*+cpu-*.whl >/dev/null 2>&1 || fail "the torch wheel is not a CPU build: $(ls "$WHEELHOUSE")"
  # The rest; --find-links makes pip take the CPU torch already there.
  echo "$requirements" >"$WORK/requirements.txt"
  "$PYTHON" -m pip download --quiet "${target[@]}" --find-links "$WHEELHOUSE" -d "$WHEELHOUSE" \
    -r "$WORK/requirements.txt" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  "$PYTHON" -m pip download --quiet --no-deps "${target[@]}" -d "$WHEELHOUSE" "nvidia-pytriton==$PYTRITON_VERSION" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  [ "$(ls "$WHEELHOUSE"/torch-*.whl | wc -l)" = 1 ] || fail "more than one torch wheel: $(ls "$WHEELHOUSE"/torch-*.whl)"
  for wheel in "$WHEELHOUSE"/nvidia_*.whl; do
    case "$wheel" in *"/nvidia_*.whl" | */nvidia_pytriton-*) ;; *) fail "a CUDA wheel in the wheelhouse: $wheel" ;; esac
  done
  echo "$stamp" >"$WHEELHOUSE/.complete"
  note "wheelhouse: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sm "$WHEELHOUSE" | cut -f1) MB, $(($(date +%s) - start)) s"
fi

# --- 5. tiny checkpoints ------------------------------------------------------------------
log "make tiny-models"
make --no-print-directory tiny-models PYTHON="$PYTHON" >"$WORK/tiny-models.log" 2>&1 ||
  { tail -20 "$WORK/tiny-models.log"; fail "make tiny-models"; }
# Mounted read-only into a non-root container: every file must be world-readable
# (safetensors writes model.safetensors with mode 0600).
chmod -R a+rX .models/tiny

# --- 6. Compose files ---------------------------------------------------------------------
log "docker compose config: docker-compose.yml, docker-compose-cpu.yml (+ profile grafana)"
for file in docker-compose.yml docker-compose-cpu.yml; do
  docker compose -f "$file" config -q || fail "docker compose -f $file config"
  docker compose -f "$file" --profile grafana config -q || fail "docker compose -f $file --profile grafana config"
done
# The two files differ in the triton service only.
"$PYTHON" - <<'EOF' || fail "docker-compose.yml and docker-compose-cpu.yml drifted apart"
import json, subprocess
def services(path):
    out = subprocess.run(["docker", "compose", "-f", path, "--profile", "grafana", "config", "--format", "json"],
                         check=True, capture_output=True, text=True).stdout
    config = json.loads(out)
    return {k: v for k, v in config["services"].items() if k != "triton"}, set(config.get("volumes", {}))
gpu, cpu = services("docker-compose.yml"), services("docker-compose-cpu.yml")
if gpu != cpu:
    names = sorted(n for n in set(gpu[0]) | set(cpu[0]) if gpu[0].get(n) != cpu[0].get(n))
    raise SystemExit(f"services other than triton differ: {names or 'volumes'}")
EOF
# One Triton per GPU (triton_start.sh on a host with 2 GPUs): the override Compose reads.
mkdir -p .cache
"$PYTHON" -m vlm_stack.gpu_compose 0,1 >.cache/compose-test-gpus.yml
"$PYTHON" - <<'EOF' || fail "the one-Triton-per-GPU override (vlm_stack/gpu_compose.py)"
import json, subprocess
out = subprocess.run(["docker", "compose", "-f", "docker-compose.yml", "-f", ".cache/compose-test-gpus.yml", "config",
                      "--format", "json"], check=True, capture_output=True, text=True).stdout
services = json.loads(out)["services"]
tritons = {name: s for name, s in services.items() if name.startswith("triton")}
assert set(tritons) == {"triton", "triton-gpu1"}, set(tritons)
for name, gpu in (("triton", "0"), ("triton-gpu1", "1")):
    (device,) = tritons[name]["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == [gpu] and "count" not in device, (name, device)
    assert "triton" in tritons[name]["networks"]["default"]["aliases"], name
for key in ("image", "environment", "healthcheck", "volumes", "shm_size"):
    assert tritons["triton-gpu1"][key] == tritons["triton"][key], key
print("one Triton per GPU: triton on GPU 0, triton-gpu1 on GPU 1, both answer to 'triton'")
EOF
# ENGINE=vllm on GPU hosts (docker-compose.vllm.yml; docs/ENGINES.md), one Triton and one per GPU
"$PYTHON" -m vlm_stack.gpu_compose 0,1 --vllm >.cache/compose-test-gpus-vllm.yml
"$PYTHON" - <<'EOF' || fail "the ENGINE=vllm override (docker-compose.vllm.yml)"
import json, subprocess
def config(*files):
    command = ["docker", "compose", *(a for f in files for a in ("-f", f)), "config", "--format", "json"]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["services"]
base = config("docker-compose.yml")["triton"]
for services in (config("docker-compose.yml", "docker-compose.vllm.yml"),
                 config("docker-compose.yml", "docker-compose.vllm.yml", ".cache/compose-test-gpus-vllm.yml")):
    tritons = {name: s for name, s in services.items() if name.startswith("triton")}
    for name, triton in tritons.items():
        assert triton["image"].endswith("/triton-gpu-vllm:latest"), (name, triton["image"])
        assert triton["build"]["target"] == "gpu" and triton["build"]["args"]["VLLM"] == "1", name
        assert triton["build"]["args"]["VLLM_FLAVOR"] == "cuda", name
        assert triton["environment"]["ENGINE"] == "vllm", name
        for key in ("healthcheck", "volumes", "shm_size"):
            assert triton[key] == base[key], (name, key)
print(f"ENGINE=vllm: {len(tritons)} Tritons on the gpu image with vLLM's environment")
EOF

# --- 7. images ----------------------------------------------------------------------------
for service in "${SERVICES[@]}"; do
  start=$(date +%s)
  log "building $service"
  "${COMPOSE[@]}" build "$service" >"$WORK/build-$service.log" 2>&1 ||
    { tail -40 "$WORK/build-$service.log"; fail "docker compose build $service (log: $WORK/build-$service.log)"; }
  image=$("${COMPOSE[@]}" config --format json | "$PYTHON" -c "import json,sys; print(json.load(sys.stdin)['services']['$service']['image'])")
  note "image $image: built in $(($(date +%s) - start)) s, $(($(docker image inspect -f '{{.Size}}' "$image") / 1000000)) MB"
done

# Old build cache and superseded images: keep the work folder from growing run after run.
docker builder prune -f --keep-storage "${BUILD_CACHE_KEEP:-4gb}" >/dev/null || true
docker image prune -f >/dev/null || true

# --- 8. up --------------------------------------------------------------------------------
start=$(date +%s)
log "docker compose -f $COMPOSE_FILE_CPU up -d --wait (tiny checkpoints)"
STACK_UP=1
"${COMPOSE[@]}" up -d --wait --wait-timeout "$UP_TIMEOUT" --no-build || fail "up --wait"
note "up --wait: $(($(date +%s) - start)) s"
"${COMPOSE[@]}" ps --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}'

# --- 9. checks ----------------------------------------------------------------------------
# Every container runs as a non-root user; only nginx and Prometheus publish ports, and in
# this test all on 127.0.0.1 (NGINX_BIND).
for service in "${SERVICES[@]}"; do
  uid=$("${COMPOSE[@]}" exec -T "$service" id -u) || fail "docker compose exec $service id -u"
  [ "$uid" != 0 ] || fail "$service runs as root"
done
published=$("${COMPOSE[@]}" ps --format '{{.Service}} {{.Ports}}' | grep -- '->' || true)
echo "$published" | awk '{print $1}' | grep -qvxE 'nginx|prometheus' && fail "unexpected published ports: $published"
echo "$published" | grep -E -- '(0\.0\.0\.0|::):[0-9]+->' && fail "a port is published beyond 127.0.0.1"
log "containers run as non-root users; published ports: $(echo "$published" | tr '\n' ';')"

url=http://127.0.0.1:$NGINX_PORT
start=$(date +%s)
for path in / /health/ready /v2/health/ready; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$url$path")
  [ "$code" = 200 ] || fail "GET $path through nginx: $code"
done
log "GET / /health/ready /v2/health/ready through nginx: 200"
"$PYTHON" - "$url" "http://127.0.0.1:$PROMETHEUS_PORT" <<'EOF' || fail "smoke checks"
import base64, io, json, sys, time, urllib.parse, urllib.request
from PIL import Image

url, prometheus = sys.argv[1], sys.argv[2]

def post(path, body, timeout=120):
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)

def get_json(full_url):
    with urllib.request.urlopen(full_url, timeout=10) as reply:
        return json.load(reply)

image = io.BytesIO()
Image.new("RGB", (160, 120), (30, 120, 200)).save(image, "PNG")
image_url = "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()
content = [{"type": "text", "text": "What is in this image?"}, {"type": "image_url", "image_url": {"url": image_url}}]
for model in ("llava", "qwen3-vl", "kosmos2", "moondream2"):
    started = time.monotonic()
    with post("/v1/chat/completions", {"model": model, "max_tokens": 8, "temperature": 0,
                                       "messages": [{"role": "user", "content": content}]}) as reply:
        answer = json.load(reply)
    assert reply.status == 200 and answer["choices"][0]["message"]["content"], answer
    print(f"POST /v1/chat/completions {model}: 200 in {time.monotonic() - started:.2f}s")
with post("/v1/chat/completions", {"model": "llava", "max_tokens": 8, "stream": True,
                                   "messages": [{"role": "user", "content": content}]}) as reply:
    events = [line for line in reply.read().decode().splitlines() if line.startswith("data:")]
assert len(events) >= 3 and events[-1].strip() == "data: [DONE]", events
print(f"POST /v1/chat/completions stream: {len(events)} SSE events")

# Prometheus: every target up; the dashboard's queries evaluate.
deadline = time.monotonic() + 60
while True:
    targets = get_json(prometheus + "/api/v1/targets")["data"]["activeTargets"]
    health = {t["labels"].get("job"): t["health"] for t in targets}
    if set(health) >= {"triton", "fastapi", "nginx", "prometheus"} and set(health.values()) == {"up"}:
        break
    assert time.monotonic() < deadline, f"Prometheus targets: {health}"
    time.sleep(2)
print(f"Prometheus targets up: {sorted(health)}")
with open("grafana/dashboards/vlm-serve.json") as f:
    exprs = [t["expr"] for p in json.load(f)["panels"] for t in p.get("targets", [])]
rules = {r["name"] for g in get_json(prometheus + "/api/v1/rules")["data"]["groups"] for r in g["rules"]}
for expr in exprs:
    answer = get_json(prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert answer["status"] == "success", (expr, answer)
    for name in (w for w in expr.replace("(", " ").replace(")", " ").split() if w.startswith("vlm:")):
        assert name in rules, f"dashboard query {expr!r}: no recording rule {name}"
print(f"Grafana dashboard: {len(exprs)} queries evaluate in Prometheus")
EOF
if "$PYTHON" -c 'import tritonclient.grpc' 2>/dev/null; then
  "$PYTHON" - "127.0.0.1:$NGINX_GRPC_PORT" <<'EOF' || fail "gRPC through nginx"
import sys
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(sys.argv[1])
assert client.is_server_ready() and client.is_model_ready("llava")
print("gRPC through nginx: server and llava ready")
EOF
fi
note "smoke checks through nginx: $(($(date +%s) - start)) s"

if [ -d tests/e2e ]; then
  start=$(date +%s)
  log "pytest tests/e2e against the Compose stack"
  # VLM_MODELS_DIR: the host's folder (the tests' fixtures look at it), not the container's.
  E2E_STACK_URL=$url E2E_PROMETHEUS_URL=http://127.0.0.1:$PROMETHEUS_PORT \
    E2E_GRPC_URL=127.0.0.1:$NGINX_GRPC_PORT VLM_MODELS_DIR=$ROOT/.models/tiny \
    "$PYTHON" -m pytest tests/e2e -q -p no:cacheprovider || fail "tests/e2e"
  note "tests/e2e: passed in $(($(date +%s) - start)) s"
else
  log "no tests/e2e yet: smoke checks only"
fi

# --- 10. faults ----------------------------------------------------------------------------
# A model's stub, the service and tritonserver killed with SIGKILL inside their containers:
# each comes back by itself, and /health/ready through nginx says "not ready" meanwhile.
log "faults: kill -9 a stub, the service, tritonserver"
kill_in() {  # kill_in SERVICE PATTERN: SIGKILL every process of SERVICE whose command line has PATTERN
  # Killing the container's main process stops the container, and the exec in it with it (137);
  # a process may also be gone by the time its turn comes. Both are the kill working.
  local rc=0
  "${COMPOSE[@]}" exec -T "$1" python -c "import os, pathlib, signal, sys
for p in pathlib.Path('/proc').iterdir():
    try:
        if p.name.isdigit() and int(p.name) != os.getpid() and sys.argv[1].encode() in (p / 'cmdline').read_bytes():
            os.kill(int(p.name), signal.SIGKILL)
    except (ProcessLookupError, FileNotFoundError):
        pass" "$2" || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 137 ] || fail "kill $2 in $1 (exit $rc)"
}
recovery() {  # recovery SERVICE PATTERN EXPECTED_NOT_READY LIMIT_S: kill, then the seconds until ready again
  "$PYTHON" - "$url/health/ready" "$3" "$4" >"$WORK/recovery.out" 2>&1 <<'EOF' &
import json, sys, time, urllib.error, urllib.request
url, named, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
started, seen = time.monotonic(), []
while time.monotonic() - started < limit:
    try:
        with urllib.request.urlopen(url, timeout=5):
            if seen:
                break
    except urllib.error.HTTPError as exc:
        seen.append(json.loads(exc.read() or b"{}") if exc.code == 503 else {"status": exc.code})
    except OSError:
        seen.append({})
    time.sleep(0.05)
else:
    sys.exit(f"not ready again after {limit} s: {seen[-1:] or 'never not ready'}")
if named != "-" and not any(named in body.get("not_ready", []) for body in seen):
    sys.exit(f"readiness never named {named}: {seen[:2]}")
print(f"{time.monotonic() - started:.1f}")
EOF
  local poller=$!
  sleep 0.5  # the poller watches before the fault
  kill_in "$1" "$2"
  wait "$poller" || fail "$1 after killing $2: $(cat "$WORK/recovery.out")"
  cat "$WORK/recovery.out"
}
restarts() { docker inspect -f '{{.RestartCount}}' "$("${COMPOSE[@]}" ps -q "$1")"; }
seconds=$(recovery triton llava_stream/1/model.py llava 300) || fail "$seconds"
note "stub of llava_stream killed: ready again in $seconds s (readiness named llava meanwhile)"
before=$(restarts fastapi)
seconds=$(recovery fastapi uvicorn - 300) || fail "$seconds"
[ "$(restarts fastapi)" -gt "$before" ] || fail "the service container was not restarted"
note "the service killed: ready again in $seconds s (container restarted by Docker)"
before=$(restarts triton)
seconds=$(recovery triton bin/tritonserver - 300) || fail "$seconds"
[ "$(restarts triton)" -gt "$before" ] || fail "the triton container was not restarted"
note "tritonserver killed: ready again in $seconds s (container restarted by Docker)"
note "answers again after the faults"

# --- 11. replicas --------------------------------------------------------------------------
# TRITON_REPLICAS=2: a second Triton joins under the same name. nginx (reloaded), the service
# (restarted: a new gRPC channel) and Prometheus (DNS, every 10 s) find it; KServe requests
# through nginx and the service's streams reach both.
start=$(date +%s)
log "TRITON_REPLICAS=2: a second Triton under the same name"
export TRITON_REPLICAS=2  # for every compose command from here: one without it would scale back to 1
"${COMPOSE[@]}" up -d --wait --wait-timeout "$UP_TIMEOUT" --no-build triton || fail "two replicas"
"${COMPOSE[@]}" exec -T nginx nginx -s reload || fail "nginx reload"
"${COMPOSE[@]}" restart fastapi >/dev/null || fail "restart fastapi"
"${COMPOSE[@]}" up -d --wait --wait-timeout "$UP_TIMEOUT" --no-build fastapi nginx || fail "fastapi after restart"
"$PYTHON" - "$url" "http://127.0.0.1:$PROMETHEUS_PORT" <<'EOF' || fail "two replicas"
import json, sys, time, urllib.parse, urllib.request
from concurrent.futures import ThreadPoolExecutor
from loadtests.payloads import Picture, kserve_json_body
from vlm_engine.tiny.samples import sample_image

url, prometheus = sys.argv[1], sys.argv[2]

def query(expr):
    with urllib.request.urlopen(prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        return {s["metric"].get("replica", "?"): float(s["value"][1]) for s in json.load(r)["data"]["result"]}

deadline = time.monotonic() + 90
while set((up := query('up{job="triton"}')).values()) != {1.0} or len(up) != 2:
    assert time.monotonic() < deadline, f"Prometheus triton targets: {up}"
    time.sleep(2)
print(f"Prometheus scrapes both replicas: {sorted(up)}")
png = Picture("p.png", "PNG", sample_image((160, 120), "PNG"))

def infer(i):
    body = kserve_json_body(f"Picture {i}?", png, 4)
    request = urllib.request.Request(url + "/v2/models/llava/infer", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return reply.status

def chat(i):
    body = {"model": "llava", "max_tokens": 4, "messages": [{"role": "user", "content": f"Hello {i}?"}]}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return reply.status

KSERVE = 'nv_inference_request_success{model="llava"}'
STREAMS = 'nv_inference_request_success{model="llava_stream"} - ignoring(model) nv_inference_request_success{model="llava"}'
before_kserve, before = query(KSERVE), query(STREAMS)
# gRPC's round-robin channel (the service's) sends only to the replicas it has connected, so a
# first burst can all go to one: rounds go on until both replicas served; each round's counts
# are read once Prometheus has scraped all of them (waiting for the scrape, not a fixed sleep)
for round_ in range(1, 6):
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(infer, range(24))) == {200} and set(pool.map(chat, range(12))) == {200}
    deadline = time.monotonic() + 120
    while True:
        kserve = {k: v - before_kserve.get(k, 0) for k, v in query(KSERVE).items()}
        service = {k: v - before.get(k, 0) for k, v in query(STREAMS).items()}
        if sum(kserve.values()) >= 24 * round_ and sum(service.values()) >= 12 * round_:
            break
        assert time.monotonic() < deadline, f"Prometheus never saw the requests: {kserve} {service}"
        time.sleep(1)
    if len(kserve) == 2 and len(service) == 2 and all(v > 0 for v in [*kserve.values(), *service.values()]):
        break
assert len(kserve) == 2 and all(v > 0 for v in kserve.values()), f"KServe per replica: {kserve}"
assert len(service) == 2 and all(v > 0 for v in service.values()), f"service streams per replica: {service}"
print(f"KServe requests per replica {sorted(kserve.values())}; the service's streams per replica {sorted(service.values())}")
EOF
note "two replicas: both scraped, both served KServe requests and the service's streams ($(($(date +%s) - start)) s)"
