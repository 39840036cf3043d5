#!/usr/bin/env bash
# Type-checks every dashboard of deploy/grafana/dashboards against Grafana's published
# schema: installs the pinned @grafana/schema and TypeScript (package-lock.json) into a
# cache outside the clone (again only when the lock changed), turns each dashboard into a
# TypeScript module (generate.mjs) and runs `tsc --noEmit` on them.
#
#   scripts/grafana-check/check.sh
#
# Needs node and npm (Debian packages `nodejs npm`; scripts/test.sh installs them). The cache
# is $FLASHSALE_GRAFANA_CHECK_DIR, default ~/.cache/flashsale/grafana-check.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="${FLASHSALE_GRAFANA_CHECK_DIR:-$HOME/.cache/flashsale/grafana-check}"
mkdir -p "$work"

if [ ! -x "$work/node_modules/.bin/tsc" ] || ! cmp -s "$here/package-lock.json" "$work/package-lock.json"; then
  echo "installing @grafana/schema and typescript into $work"
  cp "$here/package.json" "$here/package-lock.json" "$work/"
  (cd "$work" && npm ci --no-audit --no-fund --loglevel=error --cache "$work/npm-cache")
fi
cp "$here/tsconfig.json" "$here/fromjson.ts" "$work/"
node "$here/generate.mjs" "$root/deploy/grafana/dashboards" "$work/gen" "$work"
"$work/node_modules/.bin/tsc" -p "$work/tsconfig.json"
echo "every dashboard type-checks against @grafana/schema $(node -p "require('$work/node_modules/@grafana/schema/package.json').version")"
