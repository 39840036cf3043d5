//! The goose scenarios and the validation of every answer.

use crate::auth::TokenSigner;
use crate::cli::{Args, ScenarioKind};
use crate::observe::{order_final, order_status_expected, problem_code, KeyLedger, Observed};
use crate::setup::SaleInfo;
use goose::metrics::GooseRequestMetric;
use goose::prelude::*;
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Request names in goose's tables.
const ORDER: &str = "/v1/sales/{id}/orders";
const ORDER_RETRY: &str = "/v1/sales/{id}/orders (retry)";
const ORDER_RESEND: &str = "/v1/sales/{id}/orders (resend)";
const SALE: &str = "/v1/sales/{id}";
const ORDER_STATUS: &str = "/v1/orders/{id}";

/// Pause before retrying a key answered `request_in_progress`.
const IN_PROGRESS_PAUSE: Duration = Duration::from_millis(10);

/// What every goose user shares.
pub struct Ctx {
    kind: ScenarioKind,
    /// The sale under test.
    pub sale_id: String,
    order_path: String,
    sale_path: String,
    signer: TokenSigner,
    run_id: String,
    buyers: Option<u64>,
    next_buyer: AtomicU64,
    next_key: AtomicU64,
    body: serde_json::Value,
    opens_at: Option<Instant>,
    retry_timeout: Duration,
    max_attempts: u32,
    resend_rate: f64,
    poll_interval: Duration,
    poll_deadline: Duration,
    /// What the users saw.
    pub observed: Observed,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("kind", &self.kind)
            .field("sale_id", &self.sale_id)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// The shared state of a run of `args.scenario` against `sale`; rush users wait for
    /// `opens_at`. Buyer ids and keys start with `run_id`.
    pub fn new(
        args: &Args,
        sale: &SaleInfo,
        opens_at: Option<Instant>,
        run_id: String,
    ) -> anyhow::Result<Self> {
        Ok(Ctx {
            kind: args.scenario,
            order_path: format!("/v1/sales/{}/orders", sale.id),
            sale_path: format!("/v1/sales/{}", sale.id),
            sale_id: sale.id.clone(),
            signer: TokenSigner::new(
                &args.jwt_secret,
                &args.jwt_algorithm,
                &args.issuer,
                &args.audience,
                args.token_ttl,
            )?,
            run_id,
            buyers: args.buyers,
            next_buyer: AtomicU64::new(0),
            next_key: AtomicU64::new(0),
            body: serde_json::json!({
                "quantity": args.quantity,
                "payment_token": args.payment_token,
            }),
            opens_at,
            retry_timeout: args.retry_timeout,
            max_attempts: args.max_attempts,
            resend_rate: args.resend_rate,
            poll_interval: args.poll_interval,
            poll_deadline: args.poll_deadline,
            observed: Observed::default(),
        })
    }

    fn next_buyer(&self) -> Result<Buyer, Box<TransactionError>> {
        let n = self.next_buyer.fetch_add(1, Relaxed);
        let n = self.buyers.map_or(n, |b| n % b);
        let id = format!("{}-b{n}", self.run_id);
        let token = self
            .signer
            .sign(&id)
            .map_err(|e| Box::new(TransactionError::Custom(format!("{e:#}"))))?;
        Ok(Buyer { id, token })
    }

    fn next_key(&self) -> String {
        format!("{}-k{}", self.run_id, self.next_key.fetch_add(1, Relaxed))
    }
}

struct Buyer {
    id: String,
    token: String,
}

#[derive(Deserialize)]
struct AcceptedBody {
    order_id: String,
}

#[derive(Deserialize)]
struct OrderBody {
    status: String,
}

/// The answer to an order request.
enum Answer {
    Accepted {
        order_id: String,
    },
    Refused {
        status: u16,
        code: Option<String>,
    },
    /// No answer within the attempt's deadline (only with one).
    TimedOut,
}

fn custom(msg: String) -> Box<TransactionError> {
    Box::new(TransactionError::Custom(msg))
}

/// Marks `request` (made with [`GooseUser::request`]) failed in goose's metrics and fails
/// the transaction.
fn fail<T>(
    user: &mut GooseUser,
    request: &mut GooseRequestMetric,
    tag: &str,
    body: Option<&str>,
) -> Result<T, Box<TransactionError>> {
    user.set_failure(tag, request, None, body)?;
    Err(custom(tag.to_owned()))
}

fn outcome_key(method: &str, name: &str, status: u16, code: Option<&str>) -> String {
    match code {
        Some(c) => format!("{method} {name} {status} {c}"),
        None => format!("{method} {name} {status}"),
    }
}

/// Waits for goose's `--throttle-requests` bucket, as [`GooseUser::request`] does.
async fn throttle(user: &GooseUser) -> TransactionResult {
    if user.is_throttled {
        if let Some(bucket) = &user.throttle {
            bucket
                .send_async(true)
                .await
                .map_err(|e| Box::new(e.into()))?;
        }
    }
    Ok(())
}

/// Sends one order request and validates its answer: 202 with an order id, 403, 409 or
/// 429 are expected, anything else fails the transaction. With a `deadline`, a request
/// that gets no answer in time is [`Answer::TimedOut`] (a failure in goose's metrics,
/// "timed out, retried", but not an error of the run, as the caller retries it).
///
/// Orders go out with goose's client and are recorded with
/// [`GooseUser::record_custom_request_duration`] (method `POST`, time to the response
/// headers, as goose measures): [`GooseUser::request`] would mark every refusal failed,
/// and goose 0.19's `set_success` leaves the first failure in the error summary.
async fn post_order(
    user: &mut GooseUser,
    ctx: &Ctx,
    buyer: &Buyer,
    key: &str,
    name: &str,
    deadline: Option<Duration>,
) -> Result<Answer, Box<TransactionError>> {
    throttle(user).await?;
    let mut builder = user
        .client
        .post(user.build_url(&ctx.order_path)?)
        .bearer_auth(&buyer.token)
        .header("Idempotency-Key", key)
        .json(&ctx.body);
    if let Some(d) = deadline {
        builder = builder.timeout(d);
    }
    let obs = &ctx.observed;
    obs.sent(true);
    let started = std::time::Instant::now();
    let sent = builder.send().await;
    let elapsed = started.elapsed();
    let answer = match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            response.text().await.map(|text| (status, text))
        }
        Err(e) => Err(e),
    };
    let (status, text) = match answer {
        Ok(a) => a,
        Err(e) if deadline.is_some() && e.is_timeout() => {
            let tag = format!("timed out after {:?}, retried", ctx.retry_timeout);
            user.record_custom_request_duration("POST", name, elapsed, false, None, Some(&tag))
                .await?;
            obs.outcome(format!("POST {name} timeout"));
            return Ok(Answer::TimedOut);
        }
        Err(e) => {
            let tag = format!("no answer: {e}");
            user.record_custom_request_duration("POST", name, elapsed, false, None, Some(&tag))
                .await?;
            obs.outcome(format!("POST {name} no answer"));
            obs.error();
            return Err(custom(tag));
        }
    };
    obs.order_answered();
    let code = problem_code(&text);
    obs.outcome(outcome_key("POST", name, status, code.as_deref()));
    let verdict = if status == 202 {
        serde_json::from_str::<AcceptedBody>(&text)
            .map(|a| Answer::Accepted {
                order_id: a.order_id,
            })
            .map_err(|_| "202 without an order_id".to_owned())
    } else if order_status_expected(status) {
        Ok(Answer::Refused {
            status,
            code: code.clone(),
        })
    } else {
        Err(format!(
            "unexpected {status} {}",
            code.as_deref().unwrap_or("(no problem code)")
        ))
    };
    match verdict {
        Ok(answer) => {
            if let Answer::Accepted { order_id } = &answer {
                obs.accepted(order_id);
            }
            user.record_custom_request_duration("POST", name, elapsed, true, Some(status), None)
                .await?;
            Ok(answer)
        }
        Err(tag) => {
            obs.error();
            user.record_custom_request_duration(
                "POST",
                name,
                elapsed,
                false,
                Some(status),
                Some(&tag),
            )
            .await?;
            user.log_debug(&tag, None, None, Some(&text))?;
            Err(custom(tag))
        }
    }
}

/// rush: wait for the sale to open (on start).
async fn wait_for_opening(_user: &mut GooseUser, ctx: &Ctx) -> TransactionResult {
    if let Some(at) = ctx.opens_at {
        tokio::time::sleep_until(at).await;
    }
    Ok(())
}

/// rush, steady: a new buyer orders once.
async fn buy(user: &mut GooseUser, ctx: &Ctx) -> TransactionResult {
    let buyer = ctx.next_buyer()?;
    let key = ctx.next_key();
    post_order(user, ctx, &buyer, &key, ORDER, None).await?;
    Ok(())
}

/// retry-storm: send the order until it gets an answer, with the same key each time.
async fn until_answered(
    user: &mut GooseUser,
    ctx: &Ctx,
    buyer: &Buyer,
    key: &str,
    ledger: &mut KeyLedger,
    first_name: &str,
) -> TransactionResult {
    for attempt in 1..=ctx.max_attempts {
        let name = if attempt == 1 {
            first_name
        } else {
            ORDER_RETRY
        };
        let answer = post_order(user, ctx, buyer, key, name, Some(ctx.retry_timeout)).await?;
        let checked = match answer {
            Answer::TimedOut => continue,
            Answer::Refused {
                status: 409,
                code: Some(ref c),
            } if c == "request_in_progress" => {
                tokio::time::sleep(IN_PROGRESS_PAUSE).await;
                continue;
            }
            Answer::Accepted { order_id } => ledger.answered(&order_id),
            Answer::Refused { status, code } => ledger.refused(status, code.as_deref()),
        };
        return checked.map_err(|why| {
            let msg = format!("buyer {} Idempotency-Key {key}: {why}", buyer.id);
            ctx.observed.violation(msg.clone());
            custom(msg)
        });
    }
    ctx.observed.outcome(format!(
        "POST {ORDER} no answer after {} attempts",
        ctx.max_attempts
    ));
    ctx.observed.error();
    Err(custom(format!(
        "buyer {} Idempotency-Key {key}: no answer after {} attempts",
        buyer.id, ctx.max_attempts
    )))
}

/// retry-storm: a new buyer orders with a short deadline and retries; some accepted
/// orders are sent once more, as by a client that lost the answer.
async fn retry_storm(user: &mut GooseUser, ctx: &Ctx) -> TransactionResult {
    let buyer = ctx.next_buyer()?;
    let key = ctx.next_key();
    let mut ledger = KeyLedger::default();
    until_answered(user, ctx, &buyer, &key, &mut ledger, ORDER).await?;
    if ledger.order_id().is_some() && rand::random::<f64>() < ctx.resend_rate {
        until_answered(user, ctx, &buyer, &key, &mut ledger, ORDER_RESEND).await?;
    }
    Ok(())
}

/// browse-buy: read the sale, order, poll the order until it is final.
async fn browse_buy(user: &mut GooseUser, ctx: &Ctx) -> TransactionResult {
    let obs = &ctx.observed;
    let request = GooseRequest::builder()
        .path(ctx.sale_path.as_str())
        .name(SALE)
        .build();
    obs.sent(false);
    let mut goose = user.request(request).await?;
    match goose.response {
        Ok(r) if r.status().as_u16() == 200 => {
            let text = r.text().await.unwrap_or_default();
            obs.outcome(format!("GET {SALE} 200"));
            if !text.contains("\"id\"") {
                obs.error();
                return fail(user, &mut goose.request, "the sale has no id", Some(&text));
            }
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            let code = problem_code(&text);
            obs.outcome(outcome_key("GET", SALE, status, code.as_deref()));
            obs.error();
            return fail(
                user,
                &mut goose.request,
                &format!("unexpected {status}"),
                Some(&text),
            );
        }
        Err(e) => {
            obs.outcome(format!("GET {SALE} transport error"));
            obs.error();
            return fail(user, &mut goose.request, &format!("no answer: {e}"), None);
        }
    }

    let buyer = ctx.next_buyer()?;
    let key = ctx.next_key();
    let Answer::Accepted { order_id } = post_order(user, ctx, &buyer, &key, ORDER, None).await?
    else {
        return Ok(());
    };

    let deadline = Instant::now() + ctx.poll_deadline;
    let path = format!("/v1/orders/{order_id}");
    loop {
        let builder = user
            .get_request_builder(&GooseMethod::Get, &path)?
            .bearer_auth(&buyer.token);
        let request = GooseRequest::builder()
            .path(path.as_str())
            .name(ORDER_STATUS)
            .set_request_builder(builder)
            .build();
        obs.sent(false);
        let mut goose = user.request(request).await?;
        let (status, text) = match goose.response {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(e) => {
                obs.outcome(format!("GET {ORDER_STATUS} transport error"));
                obs.error();
                return fail(user, &mut goose.request, &format!("no answer: {e}"), None);
            }
        };
        let order = (status == 200)
            .then(|| serde_json::from_str::<OrderBody>(&text).ok())
            .flatten();
        let Some(order) = order else {
            let code = problem_code(&text);
            obs.outcome(outcome_key("GET", ORDER_STATUS, status, code.as_deref()));
            obs.error();
            return fail(
                user,
                &mut goose.request,
                &format!("order {order_id}: unexpected {status}"),
                Some(&text),
            );
        };
        if order_final(&order.status) {
            obs.outcome(format!("order final: {}", order.status));
            return Ok(());
        }
        if Instant::now() >= deadline {
            obs.outcome(format!("order not final within {:?}", ctx.poll_deadline));
            obs.error();
            return Err(custom(format!(
                "order {order_id} still {} after {:?}",
                order.status, ctx.poll_deadline
            )));
        }
        tokio::time::sleep(ctx.poll_interval).await;
    }
}

/// A transaction calling `$f(user, &ctx)`.
macro_rules! transaction_of {
    ($ctx:expr, $name:expr, $f:path) => {{
        let ctx: Arc<Ctx> = Arc::clone($ctx);
        let func: TransactionFunction = Arc::new(move |user| {
            let ctx = Arc::clone(&ctx);
            Box::pin(async move { $f(user, &ctx).await })
        });
        Transaction::new(func).set_name($name)
    }};
}

/// The goose scenario of `ctx`'s kind.
pub fn scenario(ctx: &Arc<Ctx>) -> Scenario {
    let mut s = Scenario::new(ctx.kind.name());
    if ctx.opens_at.is_some() {
        s = s.register_transaction(
            transaction_of!(ctx, "wait for the opening", wait_for_opening).set_on_start(),
        );
    }
    let main = match ctx.kind {
        ScenarioKind::Rush => transaction_of!(ctx, "buy", buy),
        ScenarioKind::Steady => transaction_of!(ctx, "buy", buy),
        ScenarioKind::RetryStorm => transaction_of!(ctx, "buy, retry on timeout", retry_storm),
        ScenarioKind::BrowseBuy => transaction_of!(ctx, "browse, buy, poll", browse_buy),
    };
    s.register_transaction(main)
}
