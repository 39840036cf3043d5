//! Publishing order status changes to `flashsale.order-events.v1`.
//!
//! The store keeps every status an order enters in its history, in the same transaction as
//! the change itself, marked unpublished: that history is the outbox
//! ([`OrderStore::unpublished_events`](storage::OrderStore::unpublished_events)). The
//! settler's publisher task reads it oldest first, hands a batch to the [`EventSink`], and
//! marks the batch published once the sink returned. Delivery is at least once: a crash or
//! a failed mark between the two publishes the batch again. An event's identity is
//! `(order_id, status)` (an order enters each status at most once), so consumers drop
//! repeats by that pair. Within one order, events are published in the order they happened.
//!
//! The binary implements a Kafka sink (key: the order id, value: [`encode_event`]);
//! [`TracingEventSink`] (the default) only logs, [`RecordingEventSink`] keeps events in
//! memory for tests.

use crate::Result;
use async_trait::async_trait;
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use storage::{OrderEvent, OrderId, OrderStatus, Timestamp};

/// Version of the event encoding ([`encode_event`]'s `v` field).
pub const EVENT_VERSION: u32 = 1;

/// Where status changes are published.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Publishes `events` (oldest first); returns once they are durable at the destination.
    /// An error leaves the whole batch unpublished: it is offered again later, so a sink
    /// may see an event more than once.
    async fn publish(&self, events: &[OrderEvent]) -> Result<()>;
}

/// The sink used when none is configured: logs each event at debug level and counts them.
#[derive(Debug, Default)]
pub struct TracingEventSink {
    count: AtomicU64,
}

impl TracingEventSink {
    /// Events logged so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl EventSink for TracingEventSink {
    async fn publish(&self, events: &[OrderEvent]) -> Result<()> {
        for e in events {
            tracing::debug!(
                order_id = %e.order_id,
                status = %e.status,
                at = %e.at,
                "order event (no event sink configured)"
            );
        }
        self.count.fetch_add(events.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A sink that keeps every event in memory, in publishing order (for tests). It can be told
/// to fail, to exercise redelivery.
#[derive(Debug, Default)]
pub struct RecordingEventSink {
    events: Mutex<Vec<OrderEvent>>,
    failing: std::sync::atomic::AtomicBool,
}

impl RecordingEventSink {
    /// Every event published so far, in order.
    pub fn events(&self) -> Vec<OrderEvent> {
        self.events.lock().clone()
    }

    /// Makes `publish` fail (`true`) or succeed again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }
}

#[async_trait]
impl EventSink for RecordingEventSink {
    async fn publish(&self, events: &[OrderEvent]) -> Result<()> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(crate::Error::Publish("recording sink told to fail".into()));
        }
        self.events.lock().extend_from_slice(events);
        Ok(())
    }
}

/// The wire form of an event, version 1.
#[derive(Serialize)]
struct WireEvent<'a> {
    v: u32,
    order_id: OrderId,
    sale_id: &'a str,
    user_id: &'a str,
    quantity: u32,
    status: OrderStatus,
    at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    charge_id: Option<&'a str>,
}

/// The JSON value of an event on `flashsale.order-events.v1` (the key is the order id):
///
/// ```json
/// {"v":1,"order_id":"0190…","sale_id":"spring-drop","user_id":"u-1","quantity":2,
///  "status":"paid","at":"2026-11-23T10:00:00.25Z","charge_id":"ch_…"}
/// ```
///
/// - `v`: the encoding version, [`EVENT_VERSION`] (1); a consumer refuses others.
/// - `order_id` (UUIDv7), `sale_id`, `user_id`, `quantity`: the order.
/// - `status`: the status entered: `accepted`, `persisted`, `payment_pending`, `paid`,
///   `payment_failed` or `expired`. With `order_id`, the event's identity.
/// - `at`: when, RFC 3339 UTC.
/// - `charge_id`: the provider's charge id, present on `paid` only.
pub fn encode_event(event: &OrderEvent) -> Vec<u8> {
    let wire = WireEvent {
        v: EVENT_VERSION,
        order_id: event.order_id,
        sale_id: event.sale_id.as_str(),
        user_id: event.user_id.as_str(),
        quantity: event.quantity,
        status: event.status,
        at: event.at,
        charge_id: event.charge_id.as_deref(),
    };
    // Plain strings, numbers and enums: serialization cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::{SaleId, UserId};

    #[test]
    fn encodes_version_1_json() {
        let event = OrderEvent {
            order_id: OrderId::new(),
            sale_id: SaleId::parse("sale-1").expect("sale"),
            user_id: UserId::parse("u 1").expect("user"),
            quantity: 2,
            status: OrderStatus::Paid,
            at: "2026-11-23T10:00:00.250Z".parse().expect("time"),
            charge_id: Some("ch_1".into()),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&encode_event(&event)).expect("valid json");
        assert_eq!(v["v"], 1);
        assert_eq!(v["order_id"], event.order_id.to_string());
        assert_eq!(v["sale_id"], "sale-1");
        assert_eq!(v["user_id"], "u 1");
        assert_eq!(v["quantity"], 2);
        assert_eq!(v["status"], "paid");
        assert_eq!(v["at"], "2026-11-23T10:00:00.25Z");
        assert_eq!(v["charge_id"], "ch_1");
        let pending = OrderEvent {
            status: OrderStatus::PaymentPending,
            charge_id: None,
            ..event
        };
        let v: serde_json::Value =
            serde_json::from_slice(&encode_event(&pending)).expect("valid json");
        assert!(v.get("charge_id").is_none());
        assert_eq!(v["status"], "payment_pending");
        assert_eq!(v.as_object().map(|o| o.len()), Some(7));
    }
}
