#!/usr/bin/env bash
# Download, here, the wheels a lent GPU machine lacks for `callcenter bench` and the CUDA tests.
#
# Its image has torch, numpy, safetensors, sentencepiece, prometheus-client, pyyaml, pytest and
# huggingface-hub, and reaches no package registry: the rest travels as wheels in .whl/ (ignored by
# git through .git/info/exclude) for CPython 3.12 on x86-64, at the versions of this checkout's .venv.
# bench/gpu_session.sh installs them there. See bench/README.md ("On a GPU machine").
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
python=.venv/bin/python
[ -x "$python" ] || { echo "no .venv here: run 'make setup' first" >&2; exit 1; }
rm -rf .whl && mkdir .whl
packages=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions)
pins=()
for name in "${packages[@]}"; do
    pins+=("$name==$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
