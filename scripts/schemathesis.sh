#!/usr/bin/env bash
# Property-based tests of the HTTP API against its OpenAPI document (schemathesis):
#
#   scripts/schemathesis.sh [max examples per operation, default 40]
#
# Starts `flashsale serve` on the embedded defaults on a free loopback port (a temporary
# data directory, a JWT secret and operator token of its own), waits until it is ready,
# runs schemathesis on every operation of docs/openapi.json (buyer routes with a buyer JWT,
# operator routes with the operator token), then stops the server. Fails on any 5xx, any
# answer that does not match the document (status, content type, headers, body schema),
# any schema-valid request refused, and any invalid one accepted.
#
# schemathesis lives in a venv outside the clone (~/.cache/flashsale/venv). The binary is
# built with the same CARGO_TARGET_DIR (and features) as the tests, so it costs no extra
# build when the tests run next. scripts/schemathesis_hooks.py states what the document
# cannot: relations between fields of a sale, and a sale that exists.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES="${1:-40}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flashsale/target}"
VENV="$HOME/.cache/flashsale/venv"

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "version $SCHEMATHESIS_VERSION\$"; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --locked --all-features --quiet --bin flashsale
BIN="$CARGO_TARGET_DIR/debug/flashsale"

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
export FLASHSALE_AUTH__JWT_SECRET="schemathesis-$(random)"
export FLASHSALE_AUTH__OPERATOR_TOKEN="operator-$(random)"
# Every setting else is the embedded default; no config file is read.
export FLASHSALE_CONFIG=/dev/null
unset RUST_LOG

# Created here: the background job opens its redirect only after the fork, and the
# readiness loop below may read the log before that.
: >"$WORK/serve.log"
"$BIN" serve --listen 127.0.0.1:0 --data-dir "$WORK/data" >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!

# Ready: the address printed, then /readyz answers 200; 60 s at most.
URL=""
deadline=$((SECONDS + 60))
while [ $SECONDS -lt $deadline ]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "flashsale serve exited:" >&2
    cat "$WORK/serve.log" >&2
    exit 1
  fi
  if [ -z "$URL" ]; then
    URL="$(sed -n 's/^flashsale listening on \(http:[^ ]*\)$/\1/p' "$WORK/serve.log" | head -n1)"
  fi
  if [ -n "$URL" ] && curl -sf -o /dev/null "$URL/readyz"; then
    break
  fi
  sleep 0.2
done
if [ -z "$URL" ] || ! curl -sf -o /dev/null "$URL/readyz"; then
  echo "flashsale serve was not ready within 60 s:" >&2
  cat "$WORK/serve.log" >&2
  exit 1
fi
echo "flashsale serve at $URL"

# The sale the hooks send part of the requests to (the others go to ids that do not exist).
SALE_ID=schemathesis-sale
curl -sf -o /dev/null -X POST "$URL/v1/sales" \
  -H "Authorization: Bearer $FLASHSALE_AUTH__OPERATOR_TOKEN" -H 'Content-Type: application/json' \
  -d "{\"id\":\"$SALE_ID\",\"sku\":\"sku-1\",\"stock\":1000000,\"price_cents\":1000,\"currency\":\"EUR\",\"per_user_limit\":1000,\"user_rate\":{\"per_second\":1000000,\"burst\":1000000}}"

BUYER_TOKEN="$("$BIN" token --user schemathesis --ttl 1h)"
export BUYER_TOKEN SALE_ID
cat >"$WORK/schemathesis.toml" <<'EOF'
[auth.openapi.buyerJwt]
bearer = "${BUYER_TOKEN}"

[auth.openapi.operatorToken]
bearer = "${FLASHSALE_AUTH__OPERATOR_TOKEN}"
EOF

export SCHEMATHESIS_HOOKS=schemathesis_hooks
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
status=0
"$VENV/bin/schemathesis" --config-file "$WORK/schemathesis.toml" run docs/openapi.json \
  --url "$URL" \
  --checks all \
  --max-examples "$MAX_EXAMPLES" \
  --seed 1 \
  --workers 2 \
  --request-timeout 10 \
  --phases examples,fuzzing \
  --report-dir "$WORK/report" || status=$?

if [ "$status" -ne 0 ]; then
  echo "--- flashsale serve log (tail) ---" >&2
  tail -n 50 "$WORK/serve.log" >&2
fi
exit "$status"
