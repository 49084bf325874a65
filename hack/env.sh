# Sourced by the scripts: puts the cached control-plane binaries (kubectl, helm...) first on PATH.
HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT_DIR=$(cd "$HACK_DIR/.." && pwd)
TOOLS_BIN=$("$HACK_DIR/tools.sh")
export PATH="$TOOLS_BIN:$PATH"

