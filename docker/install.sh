#!/bin/sh
# How ltcore and its dependencies are installed, everywhere: `make` (CI and developers, into .venv) and
# docker/Dockerfile (the cluster image, into the Ray image's Python) both run this file, so they cannot drift.
#
#   sh docker/install.sh PYTHON PIP-INSTALL-ARGS...
#   sh docker/install.sh .venv/bin/python -e ".[dev]"     # make: editable, with the test tools
#   sh docker/install.sh python .                         # docker/Dockerfile: the package and its runtime deps
set -eu
py="$1"
shift
"$py" -m pip install -q --upgrade pip
# torch first, as a range: a cluster image brings its own CUDA build; a pip constraint may cap it locally.
"$py" -m pip install -q "torch>=2.4" "torchvision>=0.19"
"$py" -m pip install -q "$@"
