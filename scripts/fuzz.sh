#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time, then merges what it found into the
# checked-in corpus. A benchmark-style command: not part of scripts/test.sh (the test
# command replays the corpus on stable instead, tests/fuzz_corpus.rs).
#
#   scripts/fuzz.sh [seconds per target] [target...]     # default 60 s, every target
#
# Needs the nightly toolchain and cargo-fuzz (installed with `cargo install cargo-fuzz
# --locked` when missing). Per target: libFuzzer runs for the given time (-max_total_time)
# on a working corpus in ~/.cache/flashsale/fuzz-corpus/<target>, seeded from
# fuzz/corpus/<target> and fuzz/regressions/<target> and kept from run to run, which is
# then minimized (-merge=1: the fewest inputs that reach everything it covers). A finding
# (a failed property or a crash) is minimized (cargo fuzz tmin) into
# fuzz/regressions/<target>/, where the replay test keeps it; the script then exits 1.
# The checked-in fuzz/corpus/<target> stays a curated seed set of tens of small files
# (a merge of what a few minutes reach holds hundreds); copy an input from the working
# corpus there when it is worth replaying in every test run.
#
# Environment: FUZZ_SANITIZER (default `none`: the code is safe Rust with unsafe_code
# forbidden, and without AddressSanitizer a target runs about twice the inputs per second;
# `address` to check the dependencies' unsafe code too), CARGO_TARGET_DIR (default ~/.cache/flashsale/fuzz-target, apart from
# the main build cache since instrumented builds differ).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(order_body jwt record embedded_log)
sanitizer="${FUZZ_SANITIZER:-none}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale/fuzz-target}"
work="$HOME/.cache/flashsale/fuzz-corpus"
# Inputs larger than this teach nothing more here and would bloat the checked-in corpus.
max_len=4096

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

flags=(--sanitizer "$sanitizer" --debug-assertions --fuzz-dir fuzz)
cargo +nightly fuzz build "${flags[@]}"

failed=()
for t in "${targets[@]}"; do
  printf '\n== %s: %s s ==\n' "$t" "$seconds"
  mkdir -p "$work/$t" "fuzz/corpus/$t" "fuzz/regressions/$t" "fuzz/artifacts/$t"
  seeds=("fuzz/corpus/$t")
  [ -n "$(ls -A "fuzz/regressions/$t")" ] && seeds+=("fuzz/regressions/$t")
  found=$(mktemp -d)
  log="fuzz/artifacts/$t/last-run.log"
  set +e
  cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t" "${seeds[@]}" -- \
    -max_total_time="$seconds" -max_len="$max_len" -print_final_stats=1 \
    -artifact_prefix="$found/" >"$log" 2>&1
  status=$?
  set -e
  grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+== ERROR|thread .* panicked|SUMMARY)' "$log" || true
  if [ "$status" -ne 0 ] || [ -n "$(ls -A "$found")" ]; then
    for c in "$found"/*; do
      [ -e "$c" ] || continue
      out="fuzz/regressions/$t/$(basename "$c")"
      cargo +nightly fuzz tmin "${flags[@]}" "$t" "$c" -- -exact_artifact_path="$out" \
        >/dev/null 2>&1 || cp "$c" "$out"
      cp "$c" "fuzz/artifacts/$t/"
      echo "finding: $out (the run's output: $log)"
    done
    failed+=("$t")
  fi
  rm -rf "$found"
  # Minimize the working corpus: keep the inputs that together reach all it covers.
  rm -rf "$work/$t.min" && mkdir -p "$work/$t.min"
  if cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t.min" "$work/$t" "${seeds[@]}" -- \
    -merge=1 -max_len="$max_len" >>"$log" 2>&1; then
    rm -rf "$work/$t" && mv "$work/$t.min" "$work/$t"
  else
    echo "$t: minimizing the working corpus failed (see $log); kept as it was"
  fi
  echo "$t: working corpus $(find "$work/$t" -type f | wc -l) inputs ($work/$t)"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "findings in: ${failed[*]} (see fuzz/regressions/ and fuzz/artifacts/)" >&2
  exit 1
fi
echo "no findings"
