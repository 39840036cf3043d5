//! flashsale receipts: the one-page PDF kept for each paid order (a [`Kind::Receipt`]) and for
//! each order whose late charge was refunded (a [`Kind::RefundNote`]).
//!
//! - [`Document::for_order`] decides what goes on the page from the order, its sale and the
//!   seller's name, and refuses an order that has nothing to document ([`NotReceiptable`]).
//! - [`render`] lays the document out on one A4 page and returns the PDF's bytes. The same
//!   document always gives the same bytes: no creation date, no random file id (see
//!   [`render`]).
//! - [`object_key`] names the object the PDF is stored under.
//!
//! The page uses the standard-14 fonts Helvetica and Helvetica-Bold, which every PDF reader
//! has, so no font file is embedded and nothing is looked up on the machine. Their encoding
//! (WinAnsi) holds Latin-1 and a few more characters: any other character of a buyer id, SKU
//! or seller name is written as `?` (see [`render`]).

mod money;
mod render;

pub use money::{format_money, minor_unit_exponent};
pub mod archive;

pub use archive::{Archive, ArchiveConfig, ArchiveError, Stored};
pub use render::render;

use storage::{
    HistoryEntry, Money, Order, OrderId, OrderStatus, RefundState, Sale, SaleId, Timestamp, UserId,
};

/// Which document an order gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The order was paid: the buyer's proof of purchase.
    Receipt,
    /// The order was void (expired or failed) when its charge landed, and that charge was
    /// refunded: the buyer's proof that the money went back.
    RefundNote,
}

impl Kind {
    /// Which document `order` gets, if any: a refund note once its refund is
    /// [`RefundState::Refunded`] (whatever its status: the money went back), else a receipt
    /// if it is [`OrderStatus::Paid`], else none.
    pub fn of(order: &Order) -> Option<Kind> {
        if order.refund == Some(RefundState::Refunded) {
            Some(Kind::RefundNote)
        } else if order.status == OrderStatus::Paid {
            Some(Kind::Receipt)
        } else {
            None
        }
    }

    /// The heading of the page: `Receipt` or `Refund note`.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Receipt => "Receipt",
            Kind::RefundNote => "Refund note",
        }
    }

    /// The first segment of the object keys of this kind: `receipts` or `refund-notes`.
    pub fn key_prefix(self) -> &'static str {
        match self {
            Kind::Receipt => "receipts",
            Kind::RefundNote => "refund-notes",
        }
    }
}

/// The object key of the `kind` document of `order_id`:
/// `{receipts|refund-notes}/{xx}/{order_id}.pdf`, where `xx` is the 11th byte of the UUID
/// in lower-case hex (the first two hex digits of its last group). In a UUIDv7 that byte is
/// random, so keys spread evenly over 256 prefixes instead of piling up under the
/// time-ordered head of the id; the key is still a pure function of the id and the kind.
///
/// `object_key(id, Kind::Receipt)` is e.g.
/// `receipts/8f/01936d3a-7b2c-7cde-9a41-8f0e2d3c4b5a.pdf`.
pub fn object_key(order_id: OrderId, kind: Kind) -> String {
    let spread = order_id.0.as_bytes()[10];
    format!("{}/{spread:02x}/{order_id}.pdf", kind.key_prefix())
}

/// Why an order gets no document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReceiptable {
    /// Neither paid nor refunded: nothing was charged, or a late charge is not refunded yet
    /// (owed, or refused and left to an operator).
    #[error(
        "order {order_id} is {status}{}: only a paid order gets a receipt and only a refunded one a refund note",
        refund_clause(.refund)
    )]
    NotSettled {
        /// The order.
        order_id: OrderId,
        /// Its status.
        status: OrderStatus,
        /// Its refund, if one is owed or was settled otherwise.
        refund: Option<RefundState>,
    },
    /// The sale given is not the order's.
    #[error("order {order_id} belongs to sale {order_sale}, not to sale {sale}")]
    WrongSale {
        /// The order.
        order_id: OrderId,
        /// The order's sale.
        order_sale: SaleId,
        /// The sale given.
        sale: SaleId,
    },
    /// Paid or refunded, but no charge id is recorded.
    #[error("order {order_id} has no charge id")]
    NoChargeId {
        /// The order.
        order_id: OrderId,
    },
    /// Paid, but the history holds no `paid` entry. Lists of orders (`orders_of_sale`,
    /// `orders_in_status`, ...) come without their history: read the order with
    /// `OrderStore::get_order`.
    #[error("order {order_id} is paid but its history has no paid entry (was it read without its history?)")]
    NoPaidEntry {
        /// The order.
        order_id: OrderId,
    },
}

fn refund_clause(refund: &Option<RefundState>) -> String {
    match refund {
        Some(state) => format!(" with its refund {state}"),
        None => String::new(),
    }
}

/// What goes on the page of one order's receipt or refund note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Receipt or refund note.
    pub kind: Kind,
    /// Who sells: the name at the head of the page.
    pub seller: String,
    /// The order.
    pub order_id: OrderId,
    /// Its sale.
    pub sale_id: SaleId,
    /// The item's stock-keeping unit.
    pub sku: String,
    /// Units ordered.
    pub quantity: u32,
    /// Price of one unit (the sale's).
    pub unit_price: Money,
    /// What was charged (the order's amount); on a refund note, also what was refunded.
    pub total: Money,
    /// The buyer.
    pub buyer: UserId,
    /// The provider's id of the charge (the refunded charge on a refund note).
    pub charge_id: String,
    /// When the order was paid: the `paid` entry of its history. Always there on a receipt;
    /// on a refund note only where the store kept the `paid` that lost to the void status
    /// (the SQL stores keep none: the charge landed after the order was closed).
    pub paid_at: Option<Timestamp>,
    /// Refund note: the void status the order ended in and when, if the history was read
    /// with the order. `None` on a receipt.
    pub closed: Option<HistoryEntry>,
}

impl Document {
    /// The document of `order` (of `sale`, sold by `seller`): a refund note if its refund is
    /// [`RefundState::Refunded`], else a receipt if it is paid (see [`Kind::of`]).
    ///
    /// A receipt needs the order's history (the instant paid): an order from a listing,
    /// read without it, is refused with [`NotReceiptable::NoPaidEntry`]. Both kinds need the
    /// charge id.
    pub fn for_order(order: &Order, sale: &Sale, seller: &str) -> Result<Document, NotReceiptable> {
        let order_id = order.new.order_id;
        let kind = Kind::of(order).ok_or(NotReceiptable::NotSettled {
            order_id,
            status: order.status,
            refund: order.refund,
        })?;
        if order.new.sale_id != sale.id {
            return Err(NotReceiptable::WrongSale {
                order_id,
                order_sale: order.new.sale_id.clone(),
                sale: sale.id.clone(),
            });
        }
        let charge_id = order
            .charge_id
            .clone()
            .ok_or(NotReceiptable::NoChargeId { order_id })?;
        let entered = |status: OrderStatus| order.history.iter().find(|h| h.status == status);
        let paid_at = entered(OrderStatus::Paid).map(|h| h.at);
        let closed = match kind {
            Kind::Receipt => {
                if paid_at.is_none() {
                    return Err(NotReceiptable::NoPaidEntry { order_id });
                }
                None
            }
            Kind::RefundNote => entered(order.status)
                .filter(|h| h.status.releases_stock())
                .cloned(),
        };
        Ok(Document {
            kind,
            seller: seller.to_owned(),
            order_id,
            sale_id: sale.id.clone(),
            sku: sale.sku.clone(),
            quantity: order.new.quantity,
            unit_price: sale.price,
            total: order.new.amount,
            buyer: order.new.user_id.clone(),
            charge_id,
            paid_at,
            closed,
        })
    }

    /// The rows of the page's table, label and value, in page order. Amounts are written by
    /// [`format_money`], instants as RFC 3339 in UTC.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let mut rows = vec![
            ("Order", self.order_id.to_string()),
            ("Sale", self.sale_id.to_string()),
            ("Item (SKU)", self.sku.clone()),
            ("Quantity", self.quantity.to_string()),
            ("Unit price", format_money(self.unit_price)),
        ];
        match self.kind {
            Kind::Receipt => {
                rows.push(("Total paid", format_money(self.total)));
                rows.push(("Buyer", self.buyer.to_string()));
                rows.push(("Charge", self.charge_id.clone()));
                rows.push(("Paid at", instant(self.paid_at)));
            }
            Kind::RefundNote => {
                rows.push(("Amount refunded", format_money(self.total)));
                rows.push(("Buyer", self.buyer.to_string()));
                rows.push(("Charge refunded", self.charge_id.clone()));
                if let Some(at) = self.paid_at {
                    rows.push(("Charged at", at.to_string()));
                }
                if let Some(closed) = &self.closed {
                    rows.push((
                        "Order closed",
                        format!("{} at {}", closed_status(closed.status), closed.at),
                    ));
                }
                rows.push(("Refund", "refunded in full".to_owned()));
            }
        }
        rows
    }

    /// The sentence under the table. Its amount is glued to its currency code with a
    /// no-break space (U+00A0), which the page writes as a plain space.
    pub fn statement(&self) -> String {
        let total = format_money(self.total).replace(' ', "\u{A0}");
        match self.kind {
            Kind::Receipt => format!(
                "Received with thanks: {total} for {} x {}, paid in full.",
                self.quantity, self.sku
            ),
            Kind::RefundNote => format!(
                "This order was closed before its payment arrived, so nothing was sold. The \
                 charge {} of {total} was refunded to the buyer in full.",
                self.charge_id
            ),
        }
    }
}

fn instant(at: Option<Timestamp>) -> String {
    at.map_or_else(|| "not recorded".to_owned(), |at| at.to_string())
}

fn closed_status(status: OrderStatus) -> &'static str {
    match status {
        OrderStatus::Expired => "expired",
        OrderStatus::PaymentFailed => "payment failed",
        // `closed` holds only statuses that release stock; the others for completeness.
        other => other.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_spread_over_the_random_tail_of_the_id() {
        let id: OrderId = "01936d3a-7b2c-7cde-9a41-8f0e2d3c4b5a"
            .parse()
            .expect("uuid");
        assert_eq!(
            object_key(id, Kind::Receipt),
            "receipts/8f/01936d3a-7b2c-7cde-9a41-8f0e2d3c4b5a.pdf"
        );
        assert_eq!(
            object_key(id, Kind::RefundNote),
            "refund-notes/8f/01936d3a-7b2c-7cde-9a41-8f0e2d3c4b5a.pdf"
        );
    }
}
