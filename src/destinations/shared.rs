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

/// A run asking the shared gate, for the shared queue of held runs.
pub struct QueuedRun {
    /// (created at, run id).
    pub key: (DateTime<Utc>, String),
    /// It comes back from a hold (it may be in the queue).
    pub held: bool,
    /// An older held run whose turn is in `[stale, soon]` goes first.
    pub stale: DateTime<Utc>,
    pub soon: DateTime<Utc>,
    /// Why it waits behind one.
    pub reason: HoldReason,
}

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

    /// Takes a token of the shared bucket and a shared concurrency slot, in
    /// one transaction with the destination's row locked (so the admissions
    /// of one destination are decided one at a time across instances). With
    /// `run` (a run, not a lookup), first the shared queue: an older held run
    /// whose turn is now holds this one behind it; let through, a run that
    /// comes back from a hold leaves the queue in the same transaction (an
    /// older run being let through never blocks a younger one: it waits for
    /// the lock and then finds it gone).
    /// Err: held until when, why.
    pub async fn admit(
        &self,
        dest: &DestinationSpec,
        run: Option<&QueuedRun>,
    ) -> Result<Option<Slot>, (DateTime<Utc>, HoldReason)> {
        let now = Utc::now();
        if let Err(e) = self.ensure(dest).await {
            tracing::warn!(destination = %dest.name, error = %e, "cannot record a destination; holding");
            return Err((now + chrono::TimeDelta::seconds(1), HoldReason::Concurrency));
        }
        match self.admit_in_tx(dest, run).await {
            Ok(verdict) => verdict,
            Err(e) => {
                tracing::warn!(destination = %dest.name, error = %e, "cannot take a rate token or a concurrency slot; holding");
                let reason = if dest.limits.rate.is_some() {
                    HoldReason::RateLimited
                } else {
                    HoldReason::Concurrency
                };
                Err((now + chrono::TimeDelta::seconds(1), reason))
            }
        }
    }

    async fn admit_in_tx(
        &self,
        dest: &DestinationSpec,
        run: Option<&QueuedRun>,
    ) -> Result<Result<Option<Slot>, (DateTime<Utc>, HoldReason)>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let (tat, now): (Option<DateTime<Utc>>, DateTime<Utc>) = sqlx::query_as(
            "SELECT tat, clock_timestamp() FROM destination_state WHERE name = $1 FOR UPDATE",
        )
        .bind(&dest.name)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(q) = run {
            let host_now = Utc::now();
            let turn: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT min(turn) FROM destination_queue WHERE name = $1 \
                 AND (created_at, run_id) < ($2, $3) AND turn >= $4 AND turn <= $5",
            )
            .bind(&dest.name)
            .bind(q.key.0)
            .bind(&q.key.1)
            .bind(q.stale)
            .bind(q.soon)
            .fetch_one(&mut *tx)
            .await?;
            if let Some(turn) = turn {
                tx.rollback().await?;
                return Ok(Err((turn.max(host_now), q.reason)));
            }
        }
        let slot = match dest.limits.concurrency {
            Some(cap) => {
                let token = uuid::Uuid::new_v4().simple().to_string();
                let got: Option<i32> = sqlx::query_scalar(
                    "UPDATE destination_slots SET holder = $2, expires_at = now() + make_interval(secs => $4) \
                     WHERE (name, slot) = (SELECT name, slot FROM destination_slots \
                        WHERE name = $1 AND slot < $3 AND (holder IS NULL OR expires_at < now()) \
                        ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING slot",
                )
                .bind(&dest.name)
                .bind(&token)
                .bind(cap as i32)
                .bind(SLOT_LEASE.as_secs_f64())
                .fetch_optional(&mut *tx)
                .await?;
                match got {
                    Some(slot) => Some(Slot {
                        name: dest.name.clone(),
                        slot,
                        token,
                    }),
                    None => {
                        tx.rollback().await?;
                        return Ok(Err((
                            Utc::now() + chrono::TimeDelta::milliseconds(50),
                            HoldReason::Concurrency,
                        )));
                    }
                }
            }
            None => None,
        };
        if let Some(rate) = dest.limits.rate
            && let Some(at) = Self::take_token(&mut tx, dest, rate, tat, now).await?
        {
            tx.rollback().await?;
            return Ok(Err((at, HoldReason::RateLimited)));
        }
        if let Some(q) = run.filter(|q| q.held) {
            sqlx::query(
                "DELETE FROM destination_queue WHERE name = $1 AND created_at = $2 AND run_id = $3",
            )
            .bind(&dest.name)
            .bind(q.key.0)
            .bind(&q.key.1)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Ok(slot))
    }

    /// In the admission's transaction, the destination's row locked: the
    /// token bucket (GCRA) and the sliding window (at most `count` sends in
    /// any `period`), by the database's clock (`now`). `Some(when)`: held until then.
    async fn take_token(
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        dest: &DestinationSpec,
        rate: super::Rate,
        tat: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let interval =
            chrono::TimeDelta::from_std(rate.interval()).unwrap_or(chrono::TimeDelta::MAX / 2);
        let period = chrono::TimeDelta::from_std(rate.period).unwrap_or(chrono::TimeDelta::MAX / 2);
        let tau = interval * (rate.burst.saturating_sub(1) as i32);
        let t = tat.map_or(now, |t| t.max(now));
        if t - now > tau {
            return Ok(Some(t - tau));
        }
        // The count-th most recent send inside the window, if there are that many.
        let nth: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT at FROM destination_sends WHERE name = $1 AND at > $2 ORDER BY at DESC OFFSET $3 LIMIT 1",
        )
        .bind(&dest.name)
        .bind(now - period)
        .bind(i64::from(rate.count) - 1)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(at) = nth {
            return Ok(Some(at + period));
        }
        sqlx::query("DELETE FROM destination_sends WHERE name = $1 AND at <= $2")
            .bind(&dest.name)
            .bind(now - period)
            .execute(&mut **tx)
            .await?;
        sqlx::query("INSERT INTO destination_sends (name, at) VALUES ($1, $2)")
            .bind(&dest.name)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        sqlx::query("UPDATE destination_state SET tat = $2 WHERE name = $1")
            .bind(&dest.name)
            .bind(t + interval)
            .execute(&mut **tx)
            .await?;
        Ok(None)
    }

    /// Queues a held run of `name` behind every older held run still awaited
    /// (turn at or after `stale`; older turns are forgotten: a run that never
    /// came back), in one statement: its turn is `earliest`
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
            "WITH forgotten AS (DELETE FROM destination_queue WHERE name = $1 AND turn < $4), \
             ahead AS (SELECT count(*)::float8 AS n FROM destination_queue WHERE name = $1 \
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
