//! The sale catalog, in the catalog database: create, read, list, add stock.

use super::pools::{unavailable, Db};
use super::{corrupt, PgStore};
use crate::{model::*, Error, Result, Sale, SaleId};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

pub(super) async fn create_sale(store: &PgStore, sale: &Sale) -> Result<()> {
    let body = serde_json::to_string(sale).map_err(corrupt)?;
    let db = Db::Catalog;
    let client = store.client(db).await?;
    let stmt = client
        .prepare_cached("INSERT INTO sales (id, body, stock, created_at) VALUES ($1, $2, $3, $4)")
        .await
        .map_err(|e| unavailable(db, e))?;
    let params: [&(dyn ToSql + Sync); 4] = [
        &sale.id.as_str(),
        &body,
        &i64::from(sale.stock),
        &sale.created_at.millis(),
    ];
    match client.execute(&stmt, &params).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            Err(Error::SaleExists(sale.id.clone()))
        }
        Err(e) => Err(unavailable(db, e)),
    }
}

pub(super) async fn get_sale(store: &PgStore, id: &SaleId) -> Result<Option<Sale>> {
    let rows = store
        .query(
            Db::Catalog,
            "SELECT body, stock FROM sales WHERE id = $1",
            &[&id.as_str()],
        )
        .await?;
    rows.first().map(sale_from_row).transpose()
}

pub(super) async fn list_sales(store: &PgStore) -> Result<Vec<Sale>> {
    let rows = store
        .query(
            Db::Catalog,
            "SELECT body, stock FROM sales ORDER BY created_at, id",
            &[],
        )
        .await?;
    rows.iter().map(sale_from_row).collect()
}

pub(super) async fn add_stock(store: &PgStore, id: &SaleId, units: u32) -> Result<Sale> {
    let rows = store
        .query(
            Db::Catalog,
            "UPDATE sales SET stock = stock + $2 WHERE id = $1 AND stock + $2 <= $3 \
             RETURNING body, stock",
            &[&id.as_str(), &i64::from(units), &i64::from(MAX_STOCK)],
        )
        .await?;
    if let Some(row) = rows.first() {
        return sale_from_row(row);
    }
    let exists = !store
        .query(
            Db::Catalog,
            "SELECT 1 FROM sales WHERE id = $1",
            &[&id.as_str()],
        )
        .await?
        .is_empty();
    Err(if exists {
        Error::Invalid(InvalidValue {
            field: "quantity",
            reason: "the sale's stock would exceed 100000000 units",
        })
    } else {
        Error::UnknownSale(id.clone())
    })
}

fn sale_from_row(row: &Row) -> Result<Sale> {
    let body: String = row.try_get(0).map_err(corrupt)?;
    let stock: i64 = row.try_get(1).map_err(corrupt)?;
    let mut sale: Sale = serde_json::from_str(&body).map_err(corrupt)?;
    sale.stock = u32::try_from(stock).map_err(corrupt)?;
    Ok(sale)
}
