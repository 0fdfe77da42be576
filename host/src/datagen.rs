//! The demo's data: a bank's `users` and `transactions`, written at a steady rate, with
//! injected anomalies whose ids are recorded as ground truth.
//!
//! Each user has a usual amount; normal transactions are 0.75x-1.25x of it (updates move
//! an amount by at most 10%), anomalies 8x-12x of it: far outside what the fraud rule
//! (3x the average) could confuse. Injected anomalies are recorded in
//! `weir_ground_truth`, a table that is not captured, so that a detector's precision and
//! recall can be measured against it.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

/// Schema created when missing.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
  user_id serial PRIMARY KEY,
  name text NOT NULL,
  email text NOT NULL,
  registration_date date NOT NULL DEFAULT current_date
);
CREATE TABLE IF NOT EXISTS transactions (
  transaction_id bigserial PRIMARY KEY,
  user_id int NOT NULL REFERENCES users,
  transaction_date timestamptz NOT NULL,
  amount numeric(12,2) NOT NULL
);
-- Updates and deletes carry the old row: the fraud rule (before_images) then keeps
-- per-user state only.
ALTER TABLE transactions REPLICA IDENTITY FULL;
CREATE TABLE IF NOT EXISTS weir_ground_truth (
  transaction_id bigint PRIMARY KEY,
  user_id int NOT NULL,
  amount numeric(12,2) NOT NULL,
  usual numeric(12,2) NOT NULL,
  injected_at timestamptz NOT NULL DEFAULT now()
);";

/// What to generate.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Users to create (when the table is empty).
    pub users: u32,
    /// Operations per second.
    pub rate: f64,
    /// Share of inserts that are injected anomalies.
    pub anomaly_share: f64,
    /// Share of operations that update a recent transaction.
    pub update_share: f64,
    /// Share of operations that delete a recent transaction.
    pub delete_share: f64,
    /// Stop after this many operations (`None`: until stopped).
    pub operations: Option<u64>,
    /// Seed of the pseudo-random sequence (the same seed writes the same data).
    pub seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            users: 50,
            rate: 5.0,
            anomaly_share: 0.03,
            update_share: 0.05,
            delete_share: 0.02,
            operations: None,
            seed: 42,
        }
    }
}

/// Counts of what was written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Transactions inserted.
    pub inserts: u64,
    /// Of which injected anomalies.
    pub anomalies: u64,
    /// Transactions updated.
    pub updates: u64,
    /// Transactions deleted.
    pub deletes: u64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, no dependency.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A user's usual amount: 20 to 200, fixed by the user id.
fn usual(user: u32) -> f64 {
    20.0 + ((user as u64).wrapping_mul(2_654_435_761) % 181) as f64
}

/// Creates the tables when missing and the users when there are none.
pub async fn prepare(client: &Client, settings: &Settings) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(SCHEMA).await?;
    let users: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await?
        .get(0);
    if users == 0 {
        client
            .execute(
                "INSERT INTO users (name, email, registration_date) \
                 SELECT 'user ' || i, 'user' || i || '@example.com', current_date - (i % 700) \
                 FROM generate_series(1, $1::int) i",
                &[&(settings.users.max(1) as i32)],
            )
            .await?;
    }
    Ok(())
}

/// Writes operations at `settings.rate` until `stop` resolves or the operation count is
/// reached. Each tick's operations go in one transaction.
pub async fn run(
    client: &Client,
    settings: &Settings,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Written, tokio_postgres::Error> {
    let users: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await?
        .get(0);
    let users = users.max(1) as u32;
    let mut rng = Rng(settings.seed | 1);
    let mut written = Written::default();
    let start = Instant::now();
    let mut done: u64 = 0;
    let tick = Duration::from_millis(if settings.rate >= 100.0 { 10 } else { 50 });
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(written),
            _ = interval.tick() => {}
        }
        let due = (start.elapsed().as_secs_f64() * settings.rate) as u64;
        let mut n = due.saturating_sub(done);
        if let Some(limit) = settings.operations {
            n = n.min(limit - done);
        }
        if n == 0 {
            if settings.operations.is_some_and(|l| done >= l) {
                return Ok(written);
            }
            continue;
        }
        let mut sql = String::from("BEGIN;");
        for _ in 0..n {
            let roll = rng.unit();
            let user = 1 + (rng.next() % users as u64) as u32;
            if roll < settings.delete_share {
                sql.push_str(
                    "DELETE FROM transactions WHERE transaction_id = \
                     (SELECT max(transaction_id) - 3 FROM transactions);",
                );
                written.deletes += 1;
            } else if roll < settings.delete_share + settings.update_share {
                let factor = 0.9 + 0.2 * rng.unit();
                sql.push_str(&format!(
                    "UPDATE transactions SET amount = round(amount * {factor:.4}, 2) WHERE transaction_id = \
                     (SELECT max(transaction_id) - 1 FROM transactions) \
                     AND transaction_id NOT IN (SELECT transaction_id FROM weir_ground_truth);"
                ));
                written.updates += 1;
            } else if rng.unit() < settings.anomaly_share {
                let amount = usual(user) * (8.0 + 4.0 * rng.unit());
                sql.push_str(&format!(
                    "WITH t AS (INSERT INTO transactions (user_id, transaction_date, amount) \
                     VALUES ({user}, now(), {amount:.2}) RETURNING transaction_id) \
                     INSERT INTO weir_ground_truth (transaction_id, user_id, amount, usual) \
                     SELECT transaction_id, {user}, {amount:.2}, {:.2} FROM t;",
                    usual(user)
                ));
                written.inserts += 1;
                written.anomalies += 1;
            } else {
                let amount = usual(user) * (0.75 + 0.5 * rng.unit());
                sql.push_str(&format!(
                    "INSERT INTO transactions (user_id, transaction_date, amount) \
                     VALUES ({user}, now(), {amount:.2});"
                ));
                written.inserts += 1;
            }
        }
        sql.push_str("COMMIT;");
        client.batch_execute(&sql).await?;
        done += n;
    }
}
