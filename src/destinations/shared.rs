//! Destination state shared by every instance on one PostgreSQL database:
//! the token bucket and the breaker in `destination_state` (updated
//! atomically), concurrency slots as rows with an expiry (a killed holder's
//! slot frees itself). Only destinations with a rate or a cap touch the
//! database per request; breaker states are read from a cache refreshed at
//! most every [`REFRESH`] and written only when they change.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::breaker::{Breaker, State};
use super::{DestinationSpec, Destinations, HoldReason};

/// How stale the cached breaker states may be.
pub const REFRESH: Duration = Duration::from_millis(500);
/// A concurrency slot frees itself this long after it was taken, if its holder never gives it back.
const SLOT_LEASE: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct Shared {
    pool: PgPool,
    owner: Arc<str>,
    refreshed: Arc<Mutex<Option<Instant>>>,
    ensured: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// name, breaker_state, failures, breaker_until, cool_down_ms, paused_until.
type StateRow = (
    String,
    String,
    i32,
    Option<DateTime<Utc>>,
    i64,
    Option<DateTime<Utc>>,
);

/// A concurrency slot held in the database.
pub struct Slot {
    name: String,
    slot: i32,
    token: String,
}

impl Shared {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            owner: Arc::from(uuid::Uuid::new_v4().simple().to_string()),
            refreshed: Arc::new(Mutex::new(None)),
            ensured: Arc::default(),
        }
    }

    /// A (re)loaded file: rows are (re)created on first use.
    pub fn configure(&self, _d: &Destinations) {
        self.ensured.lock().expect("ensured lock").clear();
    }

    /// Creates the state row and the concurrency slots of `dest` once per configuration.
    async fn ensure(&self, dest: &DestinationSpec) -> Result<(), sqlx::Error> {
        if self
            .ensured
            .lock()
            .expect("ensured lock")
            .contains(&dest.name)
        {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO destination_state (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&dest.name)
        .execute(&self.pool)
        .await?;
        if let Some(cap) = dest.limits.concurrency {
            sqlx::query(
                "INSERT INTO destination_slots (name, slot) SELECT $1, s FROM generate_series(0, $2 - 1) s \
                 ON CONFLICT (name, slot) DO NOTHING",
            )
            .bind(&dest.name)
            .bind(cap as i32)
            .execute(&self.pool)
            .await?;
        }
        self.ensured
            .lock()
            .expect("ensured lock")
            .insert(dest.name.clone());
        Ok(())
    }

    /// Reads every breaker state and pause when the cache is older than [`REFRESH`].
    pub async fn refresh_if_stale(&self, gate: &super::gate::Gate) {
        {
            let mut at = self.refreshed.lock().expect("refresh lock");
            if at.is_some_and(|t| t.elapsed() < REFRESH) {
                return;
            }
            *at = Some(Instant::now());
        }
        let rows: Result<Vec<StateRow>, _> =
            sqlx::query_as(
                "SELECT name, breaker_state, failures, breaker_until, cool_down_ms, paused_until FROM destination_state",
            )
            .fetch_all(&self.pool)
            .await;
        match rows {
            Ok(rows) => gate.apply_shared(
                rows.into_iter()
                    .map(|(name, state, failures, until, cool, paused)| {
                        (
                            name,
                            Breaker {
                                state: State::parse(&state),
                                failures: failures.max(0) as u32,
                                until,
                                cool_down: Duration::from_millis(cool.max(0) as u64),
                            },
                            paused,
                        )
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read destination states; using this instance's")
            }
        }
    }

    /// Takes a token of the shared bucket and a shared concurrency slot.
    /// Err: held until when, why.
    pub async fn admit(
        &self,
        dest: &DestinationSpec,
        _probe: bool,
    ) -> Result<Option<Slot>, (DateTime<Utc>, HoldReason)> {
        let now = Utc::now();
        if let Err(e) = self.ensure(dest).await {
            tracing::warn!(destination = %dest.name, error = %e, "cannot record a destination; holding");
            return Err((now + chrono::TimeDelta::seconds(1), HoldReason::Concurrency));
        }
        let slot = match dest.limits.concurrency {
            Some(cap) => {
                let token = uuid::Uuid::new_v4().simple().to_string();
                let got: Result<Option<i32>, _> = sqlx::query_scalar(
                    "UPDATE destination_slots SET holder = $2, expires_at = now() + make_interval(secs => $4) \
                     WHERE (name, slot) = (SELECT name, slot FROM destination_slots \
                        WHERE name = $1 AND slot < $3 AND (holder IS NULL OR expires_at < now()) \
                        ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING slot",
                )
                .bind(&dest.name)
                .bind(&token)
                .bind(cap as i32)
                .bind(SLOT_LEASE.as_secs_f64())
                .fetch_optional(&self.pool)
                .await;
                match got {
                    Ok(Some(slot)) => Some(Slot {
                        name: dest.name.clone(),
                        slot,
                        token,
                    }),
                    Ok(None) => {
                        return Err((
                            now + chrono::TimeDelta::milliseconds(50),
                            HoldReason::Concurrency,
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(destination = %dest.name, error = %e, "cannot take a concurrency slot; holding");
                        return Err((now + chrono::TimeDelta::seconds(1), HoldReason::Concurrency));
                    }
                }
            }
            None => None,
        };
        if let Some(rate) = dest.limits.rate {
            let held = match self.take_token(dest, rate).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(destination = %dest.name, error = %e, "cannot take a rate token; holding");
                    Some(now + chrono::TimeDelta::seconds(1))
                }
            };
            if let Some(at) = held {
                if let Some(slot) = slot {
                    self.release(slot).await;
                }
                return Err((at, HoldReason::RateLimited));
            }
        }
        Ok(slot)
    }

    /// One transaction, the destination's row locked: the token bucket (GCRA)
    /// and the sliding window (at most `count` sends in any `period`), by the
    /// database's clock. `Some(when)`: held until then.
    async fn take_token(
        &self,
        dest: &DestinationSpec,
        rate: super::Rate,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let interval =
            chrono::TimeDelta::from_std(rate.interval()).unwrap_or(chrono::TimeDelta::MAX / 2);
        let period = chrono::TimeDelta::from_std(rate.period).unwrap_or(chrono::TimeDelta::MAX / 2);
        let tau = interval * (rate.burst.saturating_sub(1) as i32);
        let mut tx = self.pool.begin().await?;
        let (tat, now): (Option<DateTime<Utc>>, DateTime<Utc>) = sqlx::query_as(
            "SELECT tat, clock_timestamp() FROM destination_state WHERE name = $1 FOR UPDATE",
        )
        .bind(&dest.name)
        .fetch_one(&mut *tx)
        .await?;
        let t = tat.map_or(now, |t| t.max(now));
        if t - now > tau {
            tx.rollback().await?;
            return Ok(Some(t - tau));
        }
        // The count-th most recent send inside the window, if there are that many.
        let nth: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT at FROM destination_sends WHERE name = $1 AND at > $2 ORDER BY at DESC OFFSET $3 LIMIT 1",
        )
        .bind(&dest.name)
        .bind(now - period)
        .bind(i64::from(rate.count) - 1)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(at) = nth {
            tx.rollback().await?;
            return Ok(Some(at + period));
        }
        sqlx::query("DELETE FROM destination_sends WHERE name = $1 AND at <= $2")
            .bind(&dest.name)
            .bind(now - period)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO destination_sends (name, at) VALUES ($1, $2)")
            .bind(&dest.name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE destination_state SET tat = $2 WHERE name = $1")
            .bind(&dest.name)
            .bind(t + interval)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(None)
    }

    /// The queue of held runs shared by every instance (`destination_queue`):
    /// the earliest turn, within `[stale, soon]`, of a run of `name` older
    /// than `key` (it goes first); forgets turns older than `stale` (a run
    /// that never came back). `Err` when the database cannot say.
    pub async fn older_turn(
        &self,
        name: &str,
        key: &(DateTime<Utc>, String),
        stale: DateTime<Utc>,
        soon: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar(
            "WITH forgotten AS (DELETE FROM destination_queue WHERE name = $1 AND turn < $4) \
             SELECT min(turn) FROM destination_queue WHERE name = $1 \
             AND (created_at, run_id) < ($2, $3) AND turn >= $4 AND turn <= $5",
        )
        .bind(name)
        .bind(key.0)
        .bind(&key.1)
        .bind(stale)
        .bind(soon)
        .fetch_one(&self.pool)
        .await
    }

    /// Queues a held run of `name` behind every older held run still awaited
    /// (turn at or after `stale`), in one statement: its turn is `earliest`
    /// plus `spacing` per run ahead of it, or, `parked` with runs ahead,
    /// `earliest + park + park_spacing` per run ahead. Returns the turn.
    #[allow(clippy::too_many_arguments)]
    pub async fn enqueue(
        &self,
        name: &str,
        key: &(DateTime<Utc>, String),
        stale: DateTime<Utc>,
        earliest: DateTime<Utc>,
        spacing: Duration,
        parked: Option<(Duration, Duration)>,
    ) -> Result<DateTime<Utc>, sqlx::Error> {
        let (park, park_spacing) = parked.unwrap_or_default();
        sqlx::query_scalar(
            "WITH ahead AS (SELECT count(*)::float8 AS n FROM destination_queue WHERE name = $1 \
                AND (created_at, run_id) < ($2, $3) AND turn >= $4) \
             INSERT INTO destination_queue AS q (name, created_at, run_id, turn) \
             SELECT $1, $2, $3, CASE WHEN $7 AND ahead.n > 0 \
                THEN $5 + make_interval(secs => $8 + $9 * ahead.n) \
                ELSE $5 + make_interval(secs => $6 * ahead.n) END FROM ahead \
             ON CONFLICT (name, created_at, run_id) DO UPDATE SET turn = EXCLUDED.turn \
             RETURNING turn",
        )
        .bind(name)
        .bind(key.0)
        .bind(&key.1)
        .bind(stale)
        .bind(earliest)
        .bind(spacing.as_secs_f64())
        .bind(parked.is_some())
        .bind(park.as_secs_f64())
        .bind(park_spacing.as_secs_f64())
        .fetch_one(&self.pool)
        .await
    }

    /// Every held run's turn has come (the breaker closed or was reset): the
    /// parked runs, woken oldest first, are waited for by younger ones.
    pub async fn turns_now(&self, name: &str) {
        let r = sqlx::query("UPDATE destination_queue SET turn = $2 WHERE name = $1 AND turn > $2")
            .bind(name)
            .bind(Utc::now())
            .execute(&self.pool)
            .await;
        if let Err(e) = r {
            tracing::warn!(destination = %name, error = %e, "cannot bring the shared queue's turns forward");
        }
    }

    /// Takes a run let through out of the shared queue.
    pub async fn dequeue(&self, name: &str, key: &(DateTime<Utc>, String)) {
        let r = sqlx::query(
            "DELETE FROM destination_queue WHERE name = $1 AND created_at = $2 AND run_id = $3",
        )
        .bind(name)
        .bind(key.0)
        .bind(&key.1)
        .execute(&self.pool)
        .await;
        if let Err(e) = r {
            tracing::warn!(destination = %name, error = %e, "cannot take a run out of the shared queue; it is forgotten after its turn");
        }
    }

    /// Reads every breaker state and pause now, however recent the cache.
    pub async fn refresh_now(&self, gate: &super::gate::Gate) {
        *self.refreshed.lock().expect("refresh lock") = None;
        self.refresh_if_stale(gate).await;
    }

    pub async fn release(&self, slot: Slot) {
        let r = sqlx::query(
            "UPDATE destination_slots SET holder = NULL, expires_at = NULL WHERE name = $1 AND slot = $2 AND holder = $3",
        )
        .bind(&slot.name)
        .bind(slot.slot)
        .bind(&slot.token)
        .execute(&self.pool)
        .await;
        if let Err(e) = r {
            tracing::warn!(destination = %slot.name, error = %e, "cannot give back a concurrency slot; it frees itself when it expires");
        }
    }

    /// Turns the shared breaker half open for this instance's probe; false
    /// when another instance's probe is already out (or the row says closed/not due).
    pub async fn claim_probe(&self, name: &str, b: &Breaker) -> bool {
        let r = sqlx::query(
            "INSERT INTO destination_state AS d (name, breaker_state, breaker_until, updated_by) \
             VALUES ($1, 'half_open', $2, $3) ON CONFLICT (name) DO UPDATE \
             SET breaker_state = 'half_open', breaker_until = $2, updated_by = $3 \
             WHERE d.breaker_state = 'closed' OR d.breaker_until IS NULL OR d.breaker_until <= $4",
        )
        .bind(name)
        .bind(b.until)
        .bind(&*self.owner)
        .bind(Utc::now())
        .execute(&self.pool)
        .await;
        match r {
            Ok(r) if r.rows_affected() == 1 => true,
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(destination = %name, error = %e, "cannot claim the probe; holding");
                false
            }
        }
    }

    pub async fn write_breaker(&self, name: &str, b: &Breaker) {
        let r = sqlx::query(
            "INSERT INTO destination_state (name, breaker_state, failures, breaker_until, cool_down_ms, updated_by) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET breaker_state = $2, failures = $3, \
             breaker_until = $4, cool_down_ms = $5, updated_by = $6",
        )
        .bind(name)
        .bind(b.state.as_str())
        .bind(b.failures as i32)
        .bind(b.until)
        .bind(b.cool_down.as_millis() as i64)
        .bind(&*self.owner)
        .execute(&self.pool)
        .await;
        if let Err(e) = r {
            tracing::warn!(destination = %name, error = %e, "cannot share a breaker state");
        }
    }

    pub async fn write_pause(&self, name: &str, until: DateTime<Utc>) {
        let r = sqlx::query(
            "INSERT INTO destination_state (name, paused_until) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET paused_until = $2",
        )
        .bind(name)
        .bind(until)
        .execute(&self.pool)
        .await;
        if let Err(e) = r {
            tracing::warn!(destination = %name, error = %e, "cannot share a pause");
        }
    }
}
