#!/bin/sh
# pip install inside an image build, offline when the host prepared a wheelhouse.
#   pip-install.sh PYTHON PIP-INSTALL-ARGUMENTS...
# The build bind-mounts docker/wheelhouse at /wheels. When $WHEELHOUSE_DIR (default
# /wheels/py<X.Y>, the building Python's version) holds wheels, everything installs from
# there with --no-index (offline, air-gapped sites, CI); a missing wheel is an error, never
# a silent download. Otherwise from the package index; TORCH_INDEX_URL (e.g.
# https://download.pytorch.org/whl/cpu) is added as an extra index so that the pinned torch
# resolves to that build.
set -eu
python=$1
shift
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
wheels=${WHEELHOUSE_DIR:-/wheels/py$version}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "pip-install: offline, from the wheelhouse $wheels"
  exec "$python" -m pip install --no-index --find-links "$wheels" --only-binary=:all: "$@"
fi
echo "pip-install: no wheels in $wheels: from the package index${TORCH_INDEX_URL:+ (+ $TORCH_INDEX_URL)}"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  exec "$python" -m pip install --only-binary=:all: --extra-index-url "$TORCH_INDEX_URL" "$@"
fi
exec "$python" -m pip install --only-binary=:all: "$@"
