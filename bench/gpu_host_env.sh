# Sourced by the GPU-host scripts of this folder (from the repository root), after they set OUT: the output
# folder, and the wheels the host lacks (sphn, pyloudnorm: carried in .whl/, no network there) on PYTHONPATH.
mkdir -p "$OUT"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1; fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
