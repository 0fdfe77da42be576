//! The fraud rule, streaming form of the analysts' query: a transaction is an anomaly when
//! its amount is more than `multiplier` times the user's average over their earlier
//! transactions.
//!
//! By default (`emit = "anomalies"`) only anomalies go to `fraud_alerts` (keyed by
//! transaction id, `is_anomaly` true): an alert table, a few rows per hundred
//! transactions. An update re-scores its transaction: one that becomes an anomaly gets an
//! alert, and an alerted one that no longer is one (or is deleted) gets its alert
//! withdrawn with a `_deleted` marker (`{"transaction_id", "_deleted": true, "lsn"}`).
//! With `emit = "all"` every scored transaction is emitted, `is_anomaly` true or false
//! (a scored copy of the table), and every delete emits the marker.
//!
//! State: per user `user:<id>` = count and sum of their transactions (16 bytes); per alerted
//! transaction `alert:<id>` (only with `emit = "anomalies"`, so that an update or delete
//! knows there is an alert to withdraw); per transaction `tx:<id>` = its user and amount
//! (so updates and deletes can be applied without a before-image), unless `before_images`
//! is set: the table then has `REPLICA IDENTITY FULL`, every update and delete carries
//! the old row, and the state holds only the users and alerts (its size follows them,
//! not the transactions).
//!
//! Config (all optional): `{"multiplier": 3.0, "min_history": 1, "table": "transactions",
//! "collection": "fraud_alerts", "emit": "anomalies", "before_images": false}`. With
//! fewer than `min_history` earlier transactions a transaction is scored but never an
//! anomaly.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use weir_plugin_sdk::{Document, Op, Output, Plugin, state};

const RULE: &str = "fraud-rule";
const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_multiplier")]
    multiplier: f64,
    #[serde(default = "default_min_history")]
    min_history: u64,
    #[serde(default = "default_table")]
    table: String,
    #[serde(default = "default_collection")]
    collection: String,
    /// The table has `REPLICA IDENTITY FULL`: take the old amount from the before-image
    /// and keep no per-transaction state.
    #[serde(default)]
    before_images: bool,
    /// Which scored transactions are emitted.
    #[serde(default)]
    emit: Emit,
}

/// Which scored transactions the rule emits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Emit {
    /// Anomalies only (and withdrawals of alerts that no longer hold).
    #[default]
    Anomalies,
    /// Every scored transaction, `is_anomaly` true or false.
    All,
}

fn default_multiplier() -> f64 {
    3.0
}
fn default_min_history() -> u64 {
    1
}
fn default_table() -> String {
    "transactions".into()
}
fn default_collection() -> String {
    "fraud_alerts".into()
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct UserStats {
    count: u64,
    sum: f64,
}

impl UserStats {
    /// A user's figures from the state: 16 bytes (count and sum, little-endian), or the
    /// JSON object earlier versions wrote (never 16 bytes long: at least 19).
    fn load(key: &str) -> UserStats {
        match state::get(key) {
            Some(b) if b.len() == 16 => UserStats {
                count: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
                sum: f64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
            },
            Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
            None => UserStats::default(),
        }
    }

    /// Stores the figures in 16 bytes: read and written on every transaction, where JSON
    /// (a float printed and parsed each time) was a tenth of the rule's time.
    fn store(&self, key: &str) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..].copy_from_slice(&self.sum.to_le_bytes());
        state::set(key, &b);
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Seen {
    user_id: i64,
    amount: f64,
}

/// The rule (public so that weir's benchmark can run it natively).
pub struct FraudRule {
    config: Config,
}

/// A state key, `<prefix><id>`, made on the stack: keys are made on every transaction, and
/// `format!` (an allocation and the formatting machinery) cost more than the lookup.
struct Key {
    buf: [u8; 32],
    len: usize,
}

impl Key {
    fn new(prefix: &str, id: i64) -> Key {
        let mut buf = [0u8; 32];
        buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
        let mut len = prefix.len();
        if id < 0 {
            buf[len] = b'-';
            len += 1;
        }
        let mut digits = [0u8; 20];
        let (mut n, mut count) = (id.unsigned_abs(), 0);
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in digits[..count].iter().rev() {
            buf[len] = d;
            len += 1;
        }
        Key { buf, len }
    }
}

impl std::ops::Deref for Key {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).expect("ASCII")
    }
}

fn user_key(user: i64) -> Key {
    Key::new("user:", user)
}

fn tx_key(tx: i64) -> Key {
    Key::new("tx:", tx)
}

fn alert_key(tx: i64) -> Key {
    Key::new("alert:", tx)
}

fn adjust(user: i64, count: i64, amount: f64) {
    let key = user_key(user);
    let mut stats = UserStats::load(&key);
    stats.count = (stats.count as i64 + count).max(0) as u64;
    stats.sum += amount;
    if stats.count == 0 {
        state::delete(&key);
    } else {
        stats.store(&key);
    }
}

/// Rounds to cents for display; the decision uses the unrounded values.
fn cents(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

impl FraudRule {
    /// Scores a transaction against the user's earlier ones, then counts it in. Returns
    /// what to emit for it: its alert, or (with `emit = "anomalies"`) nothing for a normal
    /// transaction, or the withdrawal of the alert it had.
    fn record(&self, doc: &Document, tx: i64) -> Result<Option<Output>, String> {
        let user = field(doc, "user_id")? as i64;
        let amount = field(doc, "amount")?;
        let key = user_key(user);
        let mut stats = UserStats::load(&key);
        let avg = if stats.count > 0 {
            stats.sum / stats.count as f64
        } else {
            0.0
        };
        let is_anomaly =
            stats.count >= self.config.min_history && amount > self.config.multiplier * avg;
        let out = if is_anomaly || self.config.emit == Emit::All {
            Some(self.alert(doc, tx, user, amount, avg, stats.count, is_anomaly)?)
        } else if doc.op() == Some(Op::Update) && state::get(&alert_key(tx)).is_some() {
            Some(self.withdraw(doc, tx))
        } else {
            None
        };
        if is_anomaly && self.config.emit == Emit::Anomalies {
            state::set(&alert_key(tx), b"1");
        }
        stats.count += 1;
        stats.sum += amount;
        stats.store(&key);
        if !self.config.before_images {
            state::set_json(
                &tx_key(tx),
                &Seen {
                    user_id: user,
                    amount,
                },
            );
        }
        Ok(out)
    }

    /// The marker that replaces a transaction's alert: deleted, or no longer an anomaly.
    fn withdraw(&self, doc: &Document, tx: i64) -> Output {
        if self.config.emit == Emit::Anomalies {
            state::delete(&alert_key(tx));
        }
        Output::new(
            &self.config.collection,
            tx.to_string(),
            json!({ "transaction_id": tx, "_deleted": true, "lsn": doc.lsn() }),
        )
    }

    /// The version an update or delete replaces: our own record, else the old row that
    /// PostgreSQL sent (an update's before-image; a delete's document itself, which holds
    /// the whole old row under REPLICA IDENTITY FULL, else only its key). With
    /// `before_images`, only the old row, which must then be there.
    fn old(&self, doc: &Document, tx: i64) -> Result<Option<Seen>, String> {
        if !self.config.before_images
            && let Some(seen) = state::get_json(&tx_key(tx))
        {
            return Ok(Some(seen));
        }
        let seen = |row: &serde_json::Map<String, Value>| {
            Some(Seen {
                user_id: row.get("user_id")?.as_i64()?,
                amount: match row.get("amount")? {
                    Value::String(s) => s.parse().ok()?,
                    v => v.as_f64()?,
                },
            })
        };
        let from_before = match doc.op() {
            Some(Op::Delete) => seen(doc.as_map()),
            _ => doc.before().and_then(seen),
        };
        if from_before.is_none() && self.config.before_images {
            return Err(format!(
                "transaction {tx}: no before-image with user_id and amount; run \
                 `ALTER TABLE {} REPLICA IDENTITY FULL` or set before_images = false",
                self.config.table
            ));
        }
        Ok(from_before)
    }

    /// The alert of a scored transaction (`history` earlier ones, averaging `avg`).
    #[allow(clippy::too_many_arguments)]
    fn alert(
        &self,
        doc: &Document,
        tx: i64,
        user: i64,
        amount: f64,
        avg: f64,
        history: u64,
        is_anomaly: bool,
    ) -> Result<Output, String> {
        Output::serialize(
            &self.config.collection,
            tx.to_string(),
            &Alert {
                amount: doc.get("amount"),
                amount_diff: cents(amount - avg),
                history,
                is_anomaly,
                lsn: doc.lsn(),
                multiplier: self.config.multiplier,
                rule: RULE,
                rule_version: VERSION,
                transaction_date: doc.get("transaction_date"),
                transaction_id: tx,
                user_avg: cents(avg),
                user_id: user,
            },
        )
    }
}

/// What the rule emits for a scored transaction (fields in name order, as a JSON object
/// built with `json!` would have them).
#[derive(Serialize)]
struct Alert<'a> {
    amount: Option<&'a Value>,
    amount_diff: f64,
    history: u64,
    is_anomaly: bool,
    lsn: Option<&'a str>,
    multiplier: f64,
    rule: &'a str,
    rule_version: &'a str,
    transaction_date: Option<&'a Value>,
    transaction_id: i64,
    user_avg: f64,
    user_id: i64,
}

fn field(doc: &Document, name: &str) -> Result<f64, String> {
    doc.get_f64(name)
        .ok_or_else(|| format!("transaction has no numeric `{name}`"))
}

impl Plugin for FraudRule {
    fn init(config: Value) -> Result<Self, String> {
        let config: Config =
            serde_json::from_value(config).map_err(|e| format!("fraud-rule config: {e}"))?;
        if config.multiplier.is_nan() || config.multiplier <= 0.0 {
            return Err("fraud-rule config: multiplier must be positive".into());
        }
        Ok(FraudRule { config })
    }

    fn process(&mut self, doc: &Document) -> Result<Vec<Output>, String> {
        if doc.table() != Some(self.config.table.as_str()) {
            return Ok(Vec::new());
        }
        let tx = doc
            .get_i64("transaction_id")
            .ok_or("transaction has no `transaction_id`")?;
        match doc.op() {
            Some(Op::Insert) => Ok(self.record(doc, tx)?.into_iter().collect()),
            Some(Op::Read) => {
                // A table copied again (rewritten by PostgreSQL, or configured again):
                // a transaction already recorded is replaced, not counted twice.
                if !self.config.before_images
                    && let Some(old) = state::get_json::<Seen>(&tx_key(tx))
                {
                    adjust(old.user_id, -1, -old.amount);
                }
                Ok(self.record(doc, tx)?.into_iter().collect())
            }
            Some(Op::Update) => {
                if let Some(old) = self.old(doc, tx)? {
                    adjust(old.user_id, -1, -old.amount);
                }
                Ok(self.record(doc, tx)?.into_iter().collect())
            }
            Some(Op::Delete) => {
                if let Some(old) = self.old(doc, tx)? {
                    adjust(old.user_id, -1, -old.amount);
                    if !self.config.before_images {
                        state::delete(&tx_key(tx));
                    }
                }
                let alerted = match self.config.emit {
                    Emit::All => true,
                    Emit::Anomalies => state::get(&alert_key(tx)).is_some(),
                };
                Ok(if alerted {
                    vec![self.withdraw(doc, tx)]
                } else {
                    Vec::new()
                })
            }
            Some(Op::Truncate) => {
                Err("fraud-rule cannot forget a truncated table's history yet".into())
            }
            None => Err("document has no valid _meta.op".into()),
        }
    }
}

weir_plugin_sdk::export_plugin!(FraudRule);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_as_format_writes_them() {
        for id in [0, 7, -7, 42, 1_000_000_007, i64::MAX, i64::MIN] {
            assert_eq!(&*user_key(id), format!("user:{id}"));
            assert_eq!(&*tx_key(id), format!("tx:{id}"));
            assert_eq!(&*alert_key(id), format!("alert:{id}"));
        }
    }
}
