#!/usr/bin/env bash
# Install the peers of benchmarks/peers.py, each in its own virtualenv (they are not raymed's
# dependencies): Flower's simulation engine (flwr with its Ray backend) and pfl-research (pfl).
#
#   bash benchmarks/peers/install.sh [VENV_ROOT]     # default: benchmarks/.venvs
#
# torch/torchvision are pinned to raymed's versions (same kernels for every system; an unpinned torch
# downloads gigabytes). raymed itself goes in without its dependencies, for the shared workload code
# (the CNN and its loss); the few modules that code imports need are listed below.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="${1:-benchmarks/.venvs}"
mkdir -p "$root"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$constraints"

make_venv() {  # name, peer requirement...
  local name="$1"; shift
  local venv="$root/$name"
  echo "== $name -> $venv"
  python3 -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -c "$constraints" torch==2.14.1 torchvision==0.29.1
  "$venv/bin/python" -m pip install -q -c "$constraints" "$@" psutil numpy pyyaml pydantic scikit-learn pyarrow
  "$venv/bin/python" -m pip install -q --no-deps -e .
  "$venv/bin/python" -c "import torch, raymed.models; print('$name ok: torch', torch.__version__)"
}

# flwr 1.42.0 needs certifi>=2026.10.19, which the package index here does not serve yet.
make_venv flower "flwr[simulation]==1.41.0"
make_venv pfl "pfl[pytorch]==0.6.0"
"$root/flower/bin/python" -c "import flwr, ray; print('flwr', flwr.__version__, 'ray', ray.__version__)"
"$root/pfl/bin/python" -c "import importlib.metadata as m; print('pfl', m.version('pfl'))"
