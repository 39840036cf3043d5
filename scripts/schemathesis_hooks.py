"""schemathesis hooks of scripts/schemathesis.sh: what docs/openapi.json cannot state.

- An order's quantity is at most its sale's max_quantity_per_order: generated ones are 1.
- An Idempotency-Key used again with another body is refused (422 idempotency_conflict):
  each valid generated key gets a unique suffix, so a schema-valid order is a new one.
- Stock added to a sale keeps its total within 100,000,000 units: generated additions are
  at most 1,000 (out-of-range ones are left to be refused), so that all of a run's fit on
  the script's sale.
- A sale's fields depend on each other (max_quantity_per_order <= per_user_limit, which
  defaults to 1; price_cents x max_quantity_per_order within 64 bits; ends_at after
  starts_at, which defaults to now), which JSON Schema cannot
  say: generated sales are made consistent, so a schema-valid one must be created.
- Half of the requests to a sale's routes go to the sale the script created (SALE_ID), so
  that the answers of an existing sale (202, 200, 403, 409, 429) are checked too.
"""

import os
import re
import uuid
from datetime import datetime, timedelta, timezone

import schemathesis
from hypothesis import strategies as st

SALE_ID = os.environ.get("SALE_ID", "schemathesis-sale")


def _is(ctx, method, path):
    op = ctx.operation
    return op is not None and op.method.upper() == method and op.path == path


def _time(value):
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        return None


@schemathesis.hook
def map_body(ctx, body):
    # An order's quantity is limited by its sale's max_quantity_per_order (1 by default).
    if _is(ctx, "POST", "/v1/sales/{id}/orders") and isinstance(body, dict):
        q = body.get("quantity")
        if isinstance(q, int) and not isinstance(q, bool) and q > 1:
            body["quantity"] = 1
        return body
    # A sale holds at most 100,000,000 units in all: the script's sale starts with
    # 1,000,000, so generated additions are kept small enough that every one of a run fits.
    # Out-of-range ones (the negative cases) are left as they are, to be refused.
    if _is(ctx, "POST", "/v1/sales/{id}/stock") and isinstance(body, dict):
        q = body.get("quantity")
        if isinstance(q, int) and not isinstance(q, bool) and 1000 < q <= 100_000_000:
            body["quantity"] = 1000
        return body
    if not _is(ctx, "POST", "/v1/sales") or not isinstance(body, dict):
        return body
    # An absent per_user_limit and an explicit null both mean the default, 1.
    limit = body.get("per_user_limit")
    if limit is None:
        limit = 1
    most = body.get("max_quantity_per_order")
    if isinstance(limit, int) and isinstance(most, int) and not isinstance(most, bool) and most > limit:
        body["max_quantity_per_order"] = limit
    most = body.get("max_quantity_per_order")
    if not isinstance(most, int) or isinstance(most, bool):
        most = limit if isinstance(limit, int) and not isinstance(limit, bool) else 1
    price = body.get("price_cents")
    if isinstance(price, int) and not isinstance(price, bool) and most > 0 and price <= 2**63 - 1 < price * most:
        body["price_cents"] = (2**63 - 1) // most
    starts = _time(body["starts_at"]) if body.get("starts_at") is not None else datetime.now(timezone.utc)
    ends = _time(body.get("ends_at"))
    if starts is not None and ends is not None and ends <= starts:
        body["ends_at"] = (starts + timedelta(seconds=1)).isoformat()
    return body


@schemathesis.hook
def flatmap_path_parameters(ctx, path_parameters):
    op = ctx.operation
    if op is None or not op.path.startswith("/v1/sales/{id}") or not isinstance(path_parameters, dict):
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, "id": SALE_ID}])


_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


@schemathesis.hook
def map_headers(ctx, headers):
    if not _is(ctx, "POST", "/v1/sales/{id}/orders") or not isinstance(headers, dict):
        return headers
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and _KEY.match(key):
        headers["Idempotency-Key"] = key[:95] + "-" + uuid.uuid4().hex
    return headers
