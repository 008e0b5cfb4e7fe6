#!/usr/bin/env bash
# Ray Serve for a GPU machine without internet, small enough to travel with the repository (< 64 MiB):
# the Python 3.12 manylinux x86_64 packages that scale-out needs beyond a CUDA image that already has
# torch, numpy, aiohttp, requests, pyyaml, click, filelock, msgpack, attrs, anyio, h11 (see the README's
# scale-out section), unpacked into one folder, without the parts of Ray that serving never imports
# (Java jars, the dashboard's web build, RLlib, Tune, Train, Data, LLM), as one .tar.xz.
#
#   bash bench/ray_bundle.sh [OUT_DIR]       # here, with internet: writes OUT_DIR/ray-serve-cp312.tar.xz
#   mkdir -p /tmp/site && tar -xJf OUT_DIR/ray-serve-cp312.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
#                                            # there, before 'personaplex scale serve' or bench/scaleout.py
set -euo pipefail
out=${1:-.raybundle}
python=${PYTHON312:-python3.12}
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
    || { echo "error: needs a Python 3.12 to resolve the packages: set PYTHON312=/path/to/python3.12" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --only-binary=:all: -d "$work/wheels" \
    "ray==2.60.0" "fastapi>=0.110" "uvicorn>=0.30" "websockets>=13" "jsonschema>=4" "grpcio-reflection"
# Already on the image (and not version-critical for Ray): leave them out.
for name in anyio attrs certifi charset_normalizer click filelock h11 idna msgpack numpy packaging pyyaml \
            requests urllib3; do
    rm -f "$work"/wheels/"$name"-[0-9]*.whl
done
"$python" -m pip install -q --no-deps --no-compile --target "$work/site" "$work"/wheels/*.whl
rm -rf "$work"/site/ray/{jars,rllib,tune,train,data,llm} "$work"/site/ray/dashboard/client/build "$work"/site/bin
mkdir -p "$out"
tar -C "$work/site" -cf - . | xz -T0 -9 > "$out/ray-serve-cp312.tar.xz"
ls -l "$out/ray-serve-cp312.tar.xz"
