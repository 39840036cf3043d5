"""schemathesis hooks of scripts/schemathesis.sh: what docs/openapi.json cannot state.

- A sale's fields depend on each other (max_quantity_per_order <= per_user_limit, which
  defaults to 1; ends_at after starts_at, which defaults to now), which JSON Schema cannot
  say: generated sales are made consistent, so a schema-valid one must be created.
- Half of the requests to a sale's routes go to the sale the script created (SALE_ID), so
  that the answers of an existing sale (202, 200, 403, 409, 429) are checked too.
"""

import os
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
    if not _is(ctx, "POST", "/v1/sales") or not isinstance(body, dict):
        return body
    limit = body.get("per_user_limit", 1)
    most = body.get("max_quantity_per_order")
    if isinstance(limit, int) and isinstance(most, int) and not isinstance(most, bool) and most > limit:
        body["max_quantity_per_order"] = limit
    starts = _time(body["starts_at"]) if "starts_at" in body else datetime.now(timezone.utc)
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
