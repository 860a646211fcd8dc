#!/usr/bin/env bash
# Install everything the project needs into ./.venv, idempotently.
# Debian packages (GDAL, Chromium) first, then torch (pinned CPU build), the GDAL
# bindings matching the system library, and the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.deepearth-installed
HASH=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    exit 0
fi

# python3-qgis: QGIS 3.22 for the client tests (tests/test_qgis.py, system python3)
APT_PACKAGES="libgdal-dev gdal-bin chromium chromium-driver python3-qgis qgis-providers"
missing=""
for p in $APT_PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "==> apt-get install$missing"
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip uv
UV="$VENV/bin/uv"

# torch first, pinned: the CPU wheel; an unpinned torch pulls GB of CUDA packages.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "==> torch==2.13.0 (CPU)"
    "$VPY" -m pip install -q "torch==2.13.0"
fi
TORCH_VERSION=$("$VPY" -c "import torch; print(torch.__version__)")

# GDAL bindings built against Debian's libgdal, with numpy support.
GDAL_VERSION=$(gdal-config --version)
if ! "$VPY" -c "from osgeo import gdal_array" >/dev/null 2>&1; then
    echo "==> gdal==$GDAL_VERSION bindings"
    "$UV" pip install -q --python "$VPY" numpy setuptools wheel
    "$VPY" -m pip install -q --no-build-isolation "gdal==$GDAL_VERSION"
fi

echo "==> project and test extras"
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"
echo "gdal==$GDAL_VERSION" >> "$VENV/constraints.txt"
"$UV" pip install -q --python "$VPY" --constraint "$VENV/constraints.txt" -e ".[test]"

# Bytecode for everything installed and the project's packages: uv installs without it,
# and where PYTHONDONTWRITEBYTECODE is set every process would compile its imports again
# (~10 s of CPU for `deepearth serve`'s xcube, seconds for each Dask worker).
echo "==> bytecode"
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VPY" -m compileall -q -j 0 "$SITE" cube_gen server >/dev/null 2>&1 \
    || echo "    (a few files do not compile as Python 3; they are never imported)"

echo "$HASH" > "$STAMP"
echo "==> installed into $VENV"
