#!/usr/bin/env bash
# `make fuzz`: runs every cargo-fuzz target for FUZZ_SECONDS each (default 300) and prints how
# many inputs each tried. Needs a nightly toolchain (libFuzzer's sanitizer flags); installs
# cargo-fuzz from crates.io if it is missing. A crash leaves its input under fuzz/artifacts/
# and fails the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
seconds=${FUZZ_SECONDS:-300}
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
corpus_root=${FUZZ_CORPUS:-${XDG_CACHE_HOME:-$HOME/.cache}/spice-operator-fuzz}

for target in $targets; do
  mkdir -p "$corpus_root/$target"
  log=$(mktemp)
  echo "== $target for ${seconds} s (corpus: $corpus_root/$target)"
  if ! cargo +nightly fuzz run -O "$target" "$corpus_root/$target" -- -max_total_time="$seconds" >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $target failed: its input is under fuzz/artifacts/$target, its whole log in $log" >&2
    exit 1
  fi
  grep -E '^Done [0-9]+ runs' "$log" || tail -3 "$log"
  rm -f "$log"
done
