#!/usr/bin/env bash
# Install a real tritonserver (with the Python backend) without Docker, from the
# nvidia-pytriton wheel on PyPI, into .triton/ (override with TRITON_HOME).
# The wheel is unpacked, not pip-installed: only its server binary, backends and libraries
# are used. The Python backend stub matching this Python is put into the backend folder.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_HOME=${TRITON_HOME:-$PWD/.triton}
PYTRITON_VERSION=${PYTRITON_VERSION:-0.7.0}
PYTHON=${PYTHON:-python3}
pyver=$($PYTHON -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
marker="$TRITON_HOME/.installed-$PYTRITON_VERSION-py$pyver"
if [ -f "$marker" ]; then
  echo "tritonserver already installed in $TRITON_HOME"
  exit 0
fi
mkdir -p "$TRITON_HOME/wheel"
if ! ls "$TRITON_HOME"/wheel/nvidia_pytriton-"$PYTRITON_VERSION"-*.whl >/dev/null 2>&1; then
  echo "downloading nvidia-pytriton==$PYTRITON_VERSION (about 55 MB) ..."
  $PYTHON -m pip download --quiet --no-deps --only-binary=:all: -d "$TRITON_HOME/wheel" \
    "nvidia-pytriton==$PYTRITON_VERSION"
fi
rm -rf "$TRITON_HOME/unpacked"
mkdir -p "$TRITON_HOME/unpacked"
$PYTHON - "$TRITON_HOME" "$PYTRITON_VERSION" <<'PY'
import glob, sys, zipfile
home, version = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{home}/wheel/nvidia_pytriton-{version}-*.whl")[0]
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))]
    zf.extractall(f"{home}/unpacked", members)
PY
server="$TRITON_HOME/unpacked/pytriton/tritonserver"
stub="$server/python_backend_stubs/$pyver/triton_python_backend_stub"
[ -f "$stub" ] || { echo "no Python backend stub for Python $pyver in the wheel" >&2; exit 1; }
cp "$stub" "$server/backends/python/triton_python_backend_stub"
chmod +x "$server/bin/tritonserver" "$server/backends/python/triton_python_backend_stub"
# The stub links libpython3.X.so.1.0; vlm_triton.launch points it at this Python's own.
libdir=$($PYTHON -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
if LD_LIBRARY_PATH="$libdir:$TRITON_HOME/unpacked/nvidia_pytriton.libs" \
    ldd "$server/backends/python/triton_python_backend_stub" | grep -q "not found"; then
  echo "the Python backend stub misses libraries:" >&2
  LD_LIBRARY_PATH="$libdir" ldd "$server/backends/python/triton_python_backend_stub" | grep "not found" >&2
  echo "use a Python built with --enable-shared, or on Debian/Ubuntu: apt-get install libpython$pyver" >&2
  exit 1
fi
touch "$marker"
echo "tritonserver installed: $server/bin/tritonserver"
