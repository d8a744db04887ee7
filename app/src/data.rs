//! The queries behind the pages. Lists are paged (`PAGE_SIZE` rows, `LIMIT`/`OFFSET` on an
//! indexed order) and searched by code prefix, so that they stay fast with 10,000 devices; a
//! device's tags come with their last reading in one query (`LATERAL` on the
//! `(tag_id, time desc)` index); chart series are bucketed with `date_bin`, which plain
//! PostgreSQL and TimescaleDB both have.

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

/// Rows per page of a list.
pub const PAGE_SIZE: i64 = 50;

/// One page of a list.
#[derive(Debug, Clone)]
pub struct Listing<T> {
    pub items: Vec<T>,
    /// Rows matching the search, on every page.
    pub total: i64,
    /// 1-based.
    pub page: i64,
}

impl<T> Listing<T> {
    pub fn pages(&self) -> i64 {
        ((self.total + PAGE_SIZE - 1) / PAGE_SIZE).max(1)
    }
}

fn offset(page: i64) -> i64 {
    (page.max(1) - 1) * PAGE_SIZE
}

/// A `LIKE` pattern matching what starts with `prefix`, case-insensitive (lowercased).
pub fn prefix_pattern(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 1);
    for c in prefix.trim().to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub id: i32,
    pub name: String,
    pub description: String,
    pub devices: i64,
}

fn gateway_from(row: &tokio_postgres::Row) -> Gateway {
    Gateway {
        id: row.get("id"),
        name: row.get("name"),
        description: row.get("description"),
        devices: row.get("devices"),
    }
}

const GATEWAY_SELECT: &str = "SELECT g.id, g.name, g.description,
         (SELECT count(*) FROM device d WHERE d.gateway_id = g.id) AS devices
     FROM gateway g";

/// Gateways whose name starts with `q` (or whose id is `q`), by id.
pub async fn gateways(db: &Client, q: &str, page: i64) -> anyhow::Result<Listing<Gateway>> {
    let pattern = prefix_pattern(q);
    let id: Option<i32> = q.trim().parse().ok();
    let filter = "WHERE lower(g.name) LIKE $1 OR g.id = $2";
    let total: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM gateway g {filter}"),
            &[&pattern, &id],
        )
        .await?
        .get(0);
    let rows = db
        .query(
            &format!(
                "{GATEWAY_SELECT} JOIN (SELECT g.id FROM gateway g {filter}
                     ORDER BY g.id LIMIT $3 OFFSET $4) page ON page.id = g.id
                 ORDER BY g.id"
            ),
            &[&pattern, &id, &PAGE_SIZE, &offset(page)],
        )
        .await?;
    Ok(Listing {
        items: rows.iter().map(gateway_from).collect(),
        total,
        page: page.max(1),
    })
}

pub async fn gateway(db: &Client, id: i32) -> anyhow::Result<Option<Gateway>> {
    Ok(db
        .query_opt(&format!("{GATEWAY_SELECT} WHERE g.id = $1"), &[&id])
        .await?
        .as_ref()
        .map(gateway_from))
}

/// A gateway as the form sends it, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayForm {
    /// Empty: the next free id.
    pub id: String,
    pub name: String,
    pub description: String,
}

/// Field name → message.
pub type FieldErrors = Vec<(&'static str, String)>;

/// What a gateway form becomes once checked.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayInput {
    pub id: Option<i32>,
    pub name: String,
    pub description: String,
}

impl GatewayForm {
    pub fn check(&self) -> Result<GatewayInput, FieldErrors> {
        let mut errors = FieldErrors::new();
        let id = match self.id.trim() {
            "" => None,
            text => match text.parse::<i32>() {
                Ok(id) if id > 0 => Some(id),
                _ => {
                    errors.push((
                        "id",
                        "The id is the number devices put in their topic (gateways/<id>/...): a whole number above 0.".into(),
                    ));
                    None
                }
            },
        };
        let name = self.name.trim();
        if name.is_empty() {
            errors.push(("name", "A name is required.".into()));
        } else if name.chars().count() > 200 {
            errors.push(("name", "At most 200 characters.".into()));
        }
        if self.description.chars().count() > 2000 {
            errors.push(("description", "At most 2000 characters.".into()));
        }
        if errors.is_empty() {
            Ok(GatewayInput {
                id,
                name: name.to_owned(),
                description: self.description.trim().to_owned(),
            })
        } else {
            Err(errors)
        }
    }
}

/// Creates a gateway; its id, or the field errors (an id already taken).
pub async fn create_gateway(
    db: &Client,
    input: &GatewayInput,
) -> anyhow::Result<Result<i32, FieldErrors>> {
    let inserted = match input.id {
        Some(id) => {
            db.query_one(
                "INSERT INTO gateway (id, name, description) VALUES ($1, $2, $3) RETURNING id",
                &[&id, &input.name, &input.description],
            )
            .await
        }
        None => {
            db.query_one(
                "INSERT INTO gateway (name, description) VALUES ($1, $2) RETURNING id",
                &[&input.name, &input.description],
            )
            .await
        }
    };
    match inserted {
        Ok(row) => {
            if input.id.is_some() {
                // An id chosen by hand: the generated ids continue after the largest.
                db.execute(
                    "SELECT setval(pg_get_serial_sequence('gateway', 'id'), (SELECT max(id) FROM gateway))",
                    &[],
                )
                .await?;
            }
            Ok(Ok(row.get(0)))
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(Err(vec![(
            "id",
            format!("Gateway {} already exists.", input.id.unwrap_or_default()),
        )])),
        Err(e) => Err(e.into()),
    }
}

/// Updates name and description; false when there is no such gateway.
pub async fn update_gateway(db: &Client, id: i32, input: &GatewayInput) -> anyhow::Result<bool> {
    Ok(db
        .execute(
            "UPDATE gateway SET name = $2, description = $3, updated_at = now() WHERE id = $1",
            &[&id, &input.name, &input.description],
        )
        .await?
        == 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Yes,
    NotFound,
    /// Devices still hang on the gateway (the foreign key refuses): how many.
    HasDevices(i64),
}

pub async fn delete_gateway(db: &Client, id: i32) -> anyhow::Result<Deleted> {
    match db
        .execute("DELETE FROM gateway WHERE id = $1", &[&id])
        .await
    {
        Ok(1) => Ok(Deleted::Yes),
        Ok(_) => Ok(Deleted::NotFound),
        Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
            let n: i64 = db
                .query_one("SELECT count(*) FROM device WHERE gateway_id = $1", &[&id])
                .await?
                .get(0);
            Ok(Deleted::HasDevices(n))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: i64,
    pub gateway_id: i32,
    pub gateway_name: String,
    pub code: String,
    pub name: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub tags: i64,
}

fn device_from(row: &tokio_postgres::Row) -> Device {
    Device {
        id: row.get("id"),
        gateway_id: row.get("gateway_id"),
        gateway_name: row.get("gateway_name"),
        code: row.get("code"),
        name: row.get("name"),
        first_seen_at: row.get("first_seen_at"),
        last_seen_at: row.get("last_seen_at"),
        tags: row.get("tags"),
    }
}

const DEVICE_SELECT: &str = "SELECT d.id, d.gateway_id, g.name AS gateway_name, d.code, d.name,
         d.first_seen_at, d.last_seen_at,
         (SELECT count(*) FROM tag t WHERE t.device_id = d.id) AS tags
     FROM device d JOIN gateway g ON g.id = d.gateway_id";

/// Devices (of one gateway, or all) whose code starts with `q`, by gateway and code.
pub async fn devices(
    db: &Client,
    gateway: Option<i32>,
    q: &str,
    page: i64,
) -> anyhow::Result<Listing<Device>> {
    let pattern = prefix_pattern(q);
    let filter = "WHERE ($1::int IS NULL OR d.gateway_id = $1) AND lower(d.code) LIKE $2";
    let total: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM device d {filter}"),
            &[&gateway, &pattern],
        )
        .await?
        .get(0);
    let rows = db
        .query(
            // The page's ids first: rows skipped by OFFSET must not pay for the select list.
            &format!(
                "{DEVICE_SELECT} JOIN (SELECT d.id FROM device d {filter}
                     ORDER BY d.gateway_id, d.code LIMIT $3 OFFSET $4) page ON page.id = d.id
                 ORDER BY d.gateway_id, d.code"
            ),
            &[&gateway, &pattern, &PAGE_SIZE, &offset(page)],
        )
        .await?;
    Ok(Listing {
        items: rows.iter().map(device_from).collect(),
        total,
        page: page.max(1),
    })
}

pub async fn device(db: &Client, id: i64) -> anyhow::Result<Option<Device>> {
    Ok(db
        .query_opt(&format!("{DEVICE_SELECT} WHERE d.id = $1"), &[&id])
        .await?
        .as_ref()
        .map(device_from))
}

/// A tag and its last reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Tag {
    pub id: i64,
    pub code: String,
    pub data_type: String,
    pub last_time: Option<DateTime<Utc>>,
    /// The last value as text (`None`: no reading yet).
    pub last_value: Option<String>,
}

impl Tag {
    /// Integer and float tags get a chart.
    pub fn is_numeric(&self) -> bool {
        matches!(self.data_type.as_str(), "integer" | "double precision")
    }
}

/// A stored value as text, by its `value_type`.
pub fn format_value(
    value_type: &str,
    num: Option<f64>,
    boolean: Option<bool>,
    text: Option<String>,
    json: Option<String>,
) -> String {
    match value_type {
        "integer" => num.map_or_else(String::new, |n| format!("{}", n as i64)),
        "double precision" => num.map_or_else(String::new, |n| format!("{n}")),
        "boolean" => boolean.map_or_else(String::new, |b| b.to_string()),
        "jsonb" => json.unwrap_or_default(),
        _ => text.unwrap_or_else(|| "null".to_owned()),
    }
}

/// The device's tags, by code, each with its last reading: one query, one index probe per tag.
pub async fn tags(db: &Client, device_id: i64) -> anyhow::Result<Vec<Tag>> {
    let rows = db
        .query(
            "SELECT t.id, t.code, t.data_type, r.time, r.value_type, r.value_num, r.value_bool,
                    r.value_text, r.value_json::text AS value_json
             FROM tag t
             LEFT JOIN LATERAL (
                 SELECT time, value_type, value_num, value_bool, value_text, value_json
                 FROM tag_reading WHERE tag_id = t.id ORDER BY time DESC LIMIT 1
             ) r ON true
             WHERE t.device_id = $1
             ORDER BY t.code",
            &[&device_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let value_type: Option<String> = row.get("value_type");
            Tag {
                id: row.get("id"),
                code: row.get("code"),
                data_type: row.get("data_type"),
                last_time: row.get("time"),
                last_value: value_type.map(|vt| {
                    format_value(
                        &vt,
                        row.get("value_num"),
                        row.get("value_bool"),
                        row.get("value_text"),
                        row.get("value_json"),
                    )
                }),
            }
        })
        .collect())
}

/// One bucket of a chart series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub time: DateTime<Utc>,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
}

/// The numeric readings of `tags` in `[from, to)`, averaged per `bucket` (`date_bin`), per tag.
pub async fn series(
    db: &Client,
    tags: &[i64],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Duration,
) -> anyhow::Result<HashMap<i64, Vec<Point>>> {
    let bucket = format!("{} milliseconds", bucket.as_millis().max(1));
    let rows = db
        .query(
            "SELECT tag_id, date_bin($2::text::interval, time, timestamptz '2000-01-01') AS bucket,
                    avg(value_num) AS avg, min(value_num) AS min, max(value_num) AS max
             FROM tag_reading
             WHERE tag_id = ANY($1) AND time >= $3 AND time < $4 AND value_num IS NOT NULL
             GROUP BY tag_id, bucket
             ORDER BY tag_id, bucket",
            &[&tags, &bucket, &from, &to],
        )
        .await?;
    let mut out: HashMap<i64, Vec<Point>> = HashMap::new();
    for row in &rows {
        out.entry(row.get("tag_id")).or_default().push(Point {
            time: row.get("bucket"),
            avg: row.get("avg"),
            min: row.get("min"),
            max: row.get("max"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_patterns_escape_like_wildcards() {
        assert_eq!(prefix_pattern(" PLC "), "plc%");
        assert_eq!(prefix_pattern("a_b%c\\"), "a\\_b\\%c\\\\%");
        assert_eq!(prefix_pattern(""), "%");
    }

    #[test]
    fn gateway_forms_are_checked_field_by_field() {
        let ok = GatewayForm {
            id: " 42 ".into(),
            name: " Plant ".into(),
            description: String::new(),
        };
        assert_eq!(
            ok.check().unwrap(),
            GatewayInput {
                id: Some(42),
                name: "Plant".into(),
                description: String::new()
            }
        );
        let bad = GatewayForm {
            id: "x".into(),
            name: "  ".into(),
            description: String::new(),
        };
        let fields: Vec<&str> = bad.check().unwrap_err().iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, ["id", "name"]);
        assert_eq!(
            GatewayForm {
                id: String::new(),
                name: "n".into(),
                ..Default::default()
            }
            .check()
            .unwrap()
            .id,
            None
        );
    }

    #[test]
    fn values_read_by_type() {
        assert_eq!(format_value("integer", Some(12.0), None, None, None), "12");
        assert_eq!(
            format_value("double precision", Some(1.5), None, None, None),
            "1.5"
        );
        assert_eq!(
            format_value("boolean", None, Some(true), None, None),
            "true"
        );
        assert_eq!(
            format_value("jsonb", None, None, None, Some("[1]".into())),
            "[1]"
        );
        assert_eq!(format_value("text", None, None, None, None), "null");
    }
}
