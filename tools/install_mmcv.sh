#!/usr/bin/env bash
# Install the full mmcv 2.1.0 (compiled ops) that MMDetection 3.3 and
# MMSegmentation 1.2 need: tools/install_mmcv.sh [PYTHON]
#
# - A full mmcv (one with the compiled `mmcv._ext`) already importable by
#   PYTHON is kept, whatever its version: it may be built for your CUDA.
# - Otherwise the wheel cached under
#   ${MOE_PLUGIN_CACHE:-~/.cache/moe_plugin}/wheels/py<ver>-torch<ver>/
#   is installed (seconds), replacing mmcv-lite if that is installed.
# - Without a cached wheel, mmcv 2.1.0 is built from its PyPI source (CPU
#   ops; about 23 minutes on 2 cores) with one change: its setup.py forces
#   -std=c++17, torch >= 2.10's headers need C++20. The build uses
#   setuptools<81 (newer ones drop what its setup.py imports), kept in a
#   temporary folder, and --no-build-isolation (it compiles against the
#   installed torch). The wheel goes to the cache, so that later runs and
#   CI with a cached folder skip the build.
#
# GPU users: install mmcv for your CUDA the OpenMMLab way instead,
#   pip install -U openmim && mim install 'mmcv>=2.0.0rc4,<2.2.0'
# and this script will keep it.
set -euo pipefail

PYTHON=${1:-${PYTHON:-python}}
MMCV_VERSION=2.1.0
CACHE_ROOT=${MOE_PLUGIN_CACHE:-$HOME/.cache/moe_plugin}

if "$PYTHON" - <<'EOF'
import importlib.util
import sys
try:
    import mmcv
except ImportError:
    sys.exit(1)
sys.exit(0 if importlib.util.find_spec('mmcv._ext') else 1)
EOF
then
    echo "install_mmcv: full mmcv $("$PYTHON" -c 'import mmcv; print(mmcv.__version__)') with compiled ops already installed; kept"
    exit 0
fi

PY_TAG=$("$PYTHON" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
TORCH_VERSION=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
CACHE="$CACHE_ROOT/wheels/$PY_TAG-torch$TORCH_VERSION"
find_wheel() {
    [ -d "$CACHE" ] || return 0
    find "$CACHE" -maxdepth 1 -name "mmcv-$MMCV_VERSION-*.whl" | sort | head -n 1
}
WHEEL=$(find_wheel)

if [ -z "$WHEEL" ]; then
    echo "install_mmcv: no cached wheel in $CACHE; building mmcv" \
         "$MMCV_VERSION from source (CPU ops, about 23 min on 2 cores)"
    START=$(date +%s)
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    "$PYTHON" -m pip install --quiet --target "$WORK/buildtools" \
        'setuptools<81' wheel ninja
    export PYTHONPATH="$WORK/buildtools${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$WORK/buildtools/bin:$PATH"
    "$PYTHON" -m pip download --quiet --no-deps --no-build-isolation \
        --no-binary :all: "mmcv==$MMCV_VERSION" -d "$WORK"
    tar -xzf "$WORK/mmcv-$MMCV_VERSION.tar.gz" -C "$WORK"
    SRC="$WORK/mmcv-$MMCV_VERSION"
    grep -q "'-std=c++17'" "$SRC/setup.py" || {
        echo "install_mmcv: $SRC/setup.py has no -std=c++17 flag to patch" >&2
        exit 1
    }
    sed -i "s/'-std=c++17'/'-std=c++20'/g" "$SRC/setup.py"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$PYTHON" -m pip wheel --no-deps --no-build-isolation \
        -w "$WORK/dist" "$SRC"
    BUILT=$(find "$WORK/dist" -name "mmcv-$MMCV_VERSION-*.whl" | head -n 1)
    mkdir -p "$CACHE"
    # Copied under a temporary name, then renamed: a killed run leaves no
    # half wheel in the cache.
    cp "$BUILT" "$CACHE/.$(basename "$BUILT").part"
    mv "$CACHE/.$(basename "$BUILT").part" "$CACHE/$(basename "$BUILT")"
    WHEEL=$(find_wheel)
    echo "install_mmcv: built in $(( $(date +%s) - START )) s," \
         "cached as $WHEEL"
fi

# mmcv-lite and mmcv install the same `mmcv` package: remove the lite one
# first so that uninstalling it later cannot delete the full one's files.
if "$PYTHON" -m pip show --quiet mmcv-lite >/dev/null 2>&1; then
    "$PYTHON" -m pip uninstall --quiet --yes mmcv-lite
fi
"$PYTHON" -m pip install --quiet "$WHEEL"
"$PYTHON" -c 'import mmcv.ops; import mmcv; print("install_mmcv: mmcv", mmcv.__version__, "with compiled ops installed")'
