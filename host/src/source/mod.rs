//! PostgreSQL change capture: a consistent backfill, then the pgoutput stream, as change
//! documents.
//!
//! # Delivery guarantee
//!
//! [`Capture`] delivers every change of the configured tables at least once, in commit
//! order, grouped by transaction ([`CaptureEvent::Commit`] closes each). It acknowledges
//! to PostgreSQL only the positions its consumer passes to [`Capture::acknowledge`], so a
//! crash replays what the consumer had not made durable. A consumer that records the last
//! position it made durable and passes it back as [`Resume::After`] gets exactly-once:
//! transactions that committed before that position are skipped.

mod backfill;
mod changes;
mod connection;
pub mod error;
pub use crate::relation;
mod catalog_watch;
pub mod resync;
mod setup;
mod socket;

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use connection::{ConnectionSettings, install_crypto_provider};
pub use error::SourceError;

use crate::config::SourceConfig;
use crate::decode;
use crate::document::ChangeDocument;
use crate::lsn::Lsn;
use changes::{ChangeBuilder, Decoded, Transaction, pg_time_to_unix_ms};

/// Where the consumer stands when the capture starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The consumer has nothing: backfill first (recreating the slot if it exists).
    Fresh,
    /// Every transaction that committed before this position is durable downstream.
    After(Lsn),
}

/// Options of a capture beyond the source configuration.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Where the consumer stands.
    pub resume: Resume,
    /// Stop once the stream reaches this position: every transaction that committed
    /// before it is delivered, none after it.
    pub stop_at: Option<Lsn>,
    /// Events buffered between the capture and its consumer (in batches of up to 256).
    pub buffer: usize,
    /// Capture through a temporary slot of this session (named `source.slot` as given),
    /// gone when the capture ends: for a consumer that keeps no position (`weir capture`
    /// to standard output), so that it never takes over, or drops, a pipeline's slot.
    pub temporary_slot: bool,
    /// The highest position the consumer has recorded (its tables may stand at different
    /// ones; `resume` is the lowest): a slot confirmed past it was advanced by someone
    /// else, and the capture refuses to start ([`SourceError::SlotAhead`]).
    pub recorded: Option<Lsn>,
    /// While nothing is delivered, how often to offer the server's position
    /// ([`CaptureEvent::Idle`]).
    pub idle_interval: Duration,
    /// With [`Resume::After`]: tables (OIDs) the consumer holds nothing of, added since
    /// it last recorded a position. They are copied at a snapshot of their own
    /// ([`CaptureEvent::TablesBackfilled`]) once the stream reaches that snapshot, the
    /// other tables' changes before it delivered first and none of theirs.
    pub backfill_tables: Vec<u32>,
    /// Of [`CaptureOptions::backfill_tables`], those copied again (the consumer holds
    /// them from before: rewritten by PostgreSQL, or configured again): their changes
    /// before the copy are delivered too (for their change logs; the copy supersedes
    /// them in the replica).
    pub backfill_streamed: Vec<u32>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            resume: Resume::Fresh,
            stop_at: None,
            buffer: 4096,
            temporary_slot: false,
            recorded: None,
            idle_interval: Duration::from_secs(30),
            backfill_tables: Vec::new(),
            backfill_streamed: Vec::new(),
        }
    }
}

/// What the capture delivers.
#[derive(Debug)]
pub enum CaptureEvent {
    /// The backfill starts copying a table.
    BackfillTable {
        /// The table's OID (its identity).
        oid: u32,
        /// `schema.table`, for messages.
        table: String,
        /// PostgreSQL's estimate of its row count.
        estimated_rows: u64,
        /// How many connections copy it at once (`source.backfill_connections` for a
        /// large table, 1 for a small or partitioned one).
        connections: usize,
    },
    /// A table's shape: before the backfill copies it, and whenever PostgreSQL sends a
    /// Relation message (before a table's first change of a session, and after every
    /// `ALTER TABLE`). Changes of a table always come after its schema.
    Schema(std::sync::Arc<relation::Relation>),
    /// A change (or a backfilled row).
    Change(ChangeDocument),
    /// One table's copy is complete at `position` (its snapshot's consistent point):
    /// every row it held then has been delivered. A consumer that records it keeps the
    /// table when a later table's copy is cut short: the next start copies only the
    /// tables that hold no position, at a snapshot of their own, and streams this one on
    /// from `position`.
    TableCopied {
        /// The table's OID.
        oid: u32,
        /// The snapshot's consistent point.
        position: Lsn,
    },
    /// The backfill is complete: acknowledging `position` records that.
    BackfillDone {
        /// The slot's consistent point.
        position: Lsn,
    },
    /// Tables added to a running capture ([`CaptureOptions::backfill_tables`]) are
    /// copied: every transaction that committed before `position` has been delivered
    /// (without their changes), their rows as of `position` too, and their changes from
    /// `position` on follow. Acknowledging `position` records that.
    TablesBackfilled {
        /// Their snapshot's consistent point.
        position: Lsn,
        /// The tables copied (OIDs).
        tables: Vec<u32>,
    },
    /// `weir resync` asked for a table to be copied again (see [`resync`]): the consumer
    /// copies it at a snapshot after `lsn` (by starting again with the table to be
    /// copied), so that nothing past `lsn` is acknowledged before the copy.
    Resync {
        /// The table's OID.
        oid: u32,
        /// `schema.table`, for messages.
        table: String,
        /// Where the request is in the WAL.
        lsn: Lsn,
    },
    /// Nothing to deliver up to `position` (the WAL there is other tables' or other
    /// databases'). A consumer that records it and then acknowledges it lets PostgreSQL
    /// free that WAL; one that does not loses nothing.
    Idle {
        /// The server's position; every transaction that committed before it has been
        /// delivered.
        position: Lsn,
    },
    /// A source transaction is complete (one that delivered at least one change).
    Commit {
        /// Its commit LSN (the `source.lsn` of its documents).
        lsn: Lsn,
        /// The position to acknowledge once its changes are durable.
        position: Lsn,
    },
}

/// A running capture: receive events with [`Capture::next`], acknowledge durable
/// positions with [`Capture::acknowledge`], end with [`Capture::shutdown`].
pub struct Capture {
    events: mpsc::Receiver<Result<Vec<CaptureEvent>, SourceError>>,
    /// Events of the last batch not yet handed out.
    ready: std::collections::VecDeque<CaptureEvent>,
    ack: watch::Sender<Lsn>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), SourceError>>,
    /// Where PostgreSQL has last been told we stand (read by `shutdown`).
    reported: watch::Receiver<Lsn>,
    progress: Arc<ServerProgress>,
}

/// What the server last told us of its WAL, and what we last told it.
#[derive(Debug, Default)]
pub struct ServerProgress {
    wal_end: std::sync::atomic::AtomicU64,
    confirmed: std::sync::atomic::AtomicU64,
    low_water_raises: std::sync::atomic::AtomicU64,
}

impl ServerProgress {
    /// The end of the server's WAL, as of its last message.
    pub fn wal_end(&self) -> Lsn {
        Lsn(self.wal_end.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The position last reported to the server as applied.
    pub fn confirmed(&self) -> Lsn {
        Lsn(self.confirmed.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// How often a backlog raised the replication socket's receive low-water mark (see
    /// `source/socket.rs`); 0 where the socket was not found.
    pub fn low_water_raises(&self) -> u64 {
        self.low_water_raises
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn update(&self, wal_end: u64, confirmed: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.wal_end.fetch_max(wal_end, Relaxed);
        self.confirmed.store(confirmed, Relaxed);
    }
}

impl Capture {
    /// The configured tables as the server describes them (with their primary keys),
    /// without starting anything: for work that should precede the stream.
    pub async fn describe_tables(
        cfg: &SourceConfig,
    ) -> Result<Vec<relation::TableInfo>, SourceError> {
        install_crypto_provider();
        let settings = ConnectionSettings::from_config(cfg)?;
        let client = settings.connect_sql().await?;
        setup::find_tables(&client, cfg, &settings.database).await
    }

    /// Checks the server, sets up publication and slot, and starts capturing. Problems with
    /// the server or the configuration are reported here, before any event.
    pub async fn start(cfg: &SourceConfig, opts: CaptureOptions) -> Result<Capture, SourceError> {
        install_crypto_provider();
        let settings = ConnectionSettings::from_config(cfg)?;
        let client = settings.connect_sql().await?;
        setup::check_server(&client, &settings.user).await?;
        let tables = setup::find_tables(&client, cfg, &settings.database).await?;
        let types = setup::load_types(&client, &tables).await?;
        let publications = setup::ensure_publications(
            &client,
            cfg,
            &tables,
            &settings.user,
            matches!(opts.resume, Resume::After(_)),
            &opts.backfill_tables,
        )
        .await?;

        let slot = setup::slot_state(&client, &cfg.slot).await?;
        if let Some(s) = &slot {
            if let Some(pid) = s.active_pid {
                return Err(SourceError::SlotInUse {
                    slot: cfg.slot.clone(),
                    pid,
                });
            }
            if s.slot_type != "logical" || s.plugin != "pgoutput" {
                return Err(SourceError::SlotUnusable {
                    slot: cfg.slot.clone(),
                    reason: format!(
                        "it is a {} slot with plugin `{}`; weir needs a logical slot with pgoutput. \
                         Drop it or configure another source.slot",
                        s.slot_type, s.plugin
                    ),
                });
            }
            if s.database.as_deref() != Some(settings.database.as_str()) {
                return Err(SourceError::SlotUnusable {
                    slot: cfg.slot.clone(),
                    reason: format!(
                        "it belongs to database `{}`, not `{}`",
                        s.database.as_deref().unwrap_or("?"),
                        settings.database
                    ),
                });
            }
        }

        let mut repl_cfg = settings.replication_config(&cfg.slot, publications.clone());
        repl_cfg.status_interval = Duration::from_millis(cfg.status_interval_ms);
        repl_cfg.idle_wakeup_interval = Duration::from_millis(cfg.status_interval_ms);

        let (tx, rx) = mpsc::channel(opts.buffer.div_ceil(BATCH).max(2));
        // Resuming, the transport reports the start position (what the consumer holds)
        // as applied at once: nothing to acknowledge before the consumer does.
        let (ack_tx, ack_rx) = watch::channel(Lsn::ZERO);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (reported_tx, reported_rx) = watch::channel(Lsn::ZERO);
        let slot_name = cfg.slot.clone();
        let repl_err = move |slot: &str| {
            let slot = slot.to_string();
            move |source| SourceError::Replication { slot, source }
        };

        let (repl, resume_at, backfill) = match (slot, opts.resume) {
            (None, Resume::After(position)) => {
                return Err(SourceError::SlotLost {
                    slot: cfg.slot.clone(),
                    position,
                });
            }
            (Some(s), Resume::After(position)) => {
                let held = opts.recorded.unwrap_or(position).max(position);
                if let Some(confirmed) = s.confirmed_flush.filter(|c| *c > held) {
                    return Err(SourceError::SlotAhead {
                        slot: cfg.slot.clone(),
                        confirmed,
                        held,
                    });
                }
                repl_cfg.start_lsn = position.into();
                let repl = connect_within(&settings, ReplicationClient::connect(repl_cfg.clone()))
                    .await?
                    .map_err(repl_err(&slot_name))?;
                (repl, position, None)
            }
            (Some(_), Resume::Fresh) if opts.temporary_slot => {
                return Err(SourceError::SlotUnusable {
                    slot: cfg.slot.clone(),
                    reason: "a slot of that name exists; a capture without a position uses a \
                             temporary slot of its own and never takes over an existing one"
                        .into(),
                });
            }
            (existing, Resume::Fresh) => {
                if existing.is_some() {
                    tracing::warn!(
                        slot = %cfg.slot,
                        "the slot exists but the output holds no completed backfill: recreating the slot and backfilling"
                    );
                    setup::drop_slot(&client, &cfg.slot).await?;
                }
                let mut repl = connect_within(
                    &settings,
                    ReplicationClient::connect_gated(repl_cfg.clone()),
                )
                .await?
                .map_err(repl_err(&slot_name))?;
                let (consistent_point, snapshot) =
                    backfill::create_slot(&mut repl, &cfg.slot, opts.temporary_slot)
                        .await
                        .map_err(|e| match e {
                            SourceError::Replication { source, .. } if source.is_auth() => {
                                SourceError::Authentication {
                                    user: settings.user.clone(),
                                    target: settings.target(),
                                    reason: source.to_string(),
                                }
                            }
                            other => other,
                        })?;
                tracing::info!(slot = %cfg.slot, %consistent_point, "created replication slot");
                (repl, consistent_point, Some((snapshot, consistent_point)))
            }
        };

        // Tables added since the consumer's last position: a snapshot of their own, held
        // by a temporary slot's session until they are copied.
        let adding = match opts.resume {
            Resume::After(floor) if !opts.backfill_tables.is_empty() => {
                let name = format!(
                    "{}_add_{}",
                    cfg.slot.chars().take(40).collect::<String>(),
                    std::process::id()
                );
                let held_cfg = settings.replication_config(&name, publications.clone());
                let mut held =
                    connect_within(&settings, ReplicationClient::connect_gated(held_cfg))
                        .await?
                        .map_err(repl_err(&name))?;
                let (point, snapshot) = backfill::create_slot(&mut held, &name, true).await?;
                let added: Vec<relation::TableInfo> = tables
                    .iter()
                    .filter(|t| opts.backfill_tables.contains(&t.oid))
                    .cloned()
                    .collect();
                tracing::info!(
                    tables = ?added.iter().map(|t| t.display()).collect::<Vec<_>>(),
                    %point,
                    "tables new to the output: copied once the stream reaches their snapshot"
                );
                let mut reconnect = repl_cfg.clone();
                reconnect.start_lsn = point.into();
                Some(Adding {
                    held,
                    snapshot,
                    point,
                    tables: added,
                    types: types.clone(),
                    reconnect,
                    settings: settings.clone(),
                    floor,
                    streamed: opts.backfill_streamed.clone(),
                })
            }
            _ => None,
        };

        // Started last: nothing after it can fail and leave it running.
        let watcher = tokio::spawn(catalog_watch::watch_tables(
            settings.clone(),
            tables.clone(),
            publications,
        ));
        let progress = Arc::new(ServerProgress::default());
        let worker = Worker {
            progress: progress.clone(),
            slot: slot_name,
            events: Outbox::new(tx),
            ack: ack_rx,
            stop: stop_rx,
            reported: reported_tx,
            builder: ChangeBuilder::new(
                types.clone(),
                tables
                    .iter()
                    .map(|t| (t.oid, t.primary_key.clone()))
                    .collect(),
            ),
            resume_at,
            durable: resume_at,
            delivered: resume_at,
            stop_at: opts.stop_at,
            watcher,
            gated: backfill.is_some(),
            catalog: None,
            idle_interval: opts.idle_interval,
            // The first idle position may be offered at once.
            idle_offered: (
                Lsn::ZERO,
                tokio::time::Instant::now()
                    .checked_sub(opts.idle_interval)
                    .unwrap_or_else(tokio::time::Instant::now),
            ),
            txn_changes: 0,
            adding,
            held_back: std::collections::HashSet::new(),
            reached_stop: false,
            // At least two status updates apart: the server's last word from us is that old.
            receive_timeout: (cfg.receive_timeout_s > 0).then(|| {
                Duration::from_secs(cfg.receive_timeout_s)
                    .max(2 * Duration::from_millis(cfg.status_interval_ms))
            }),
            copiers: backfill::Copiers {
                settings: settings.clone(),
                connections: cfg.backfill_connections,
            },
        };
        let backfill = backfill.map(|(snapshot, point)| Backfill {
            snapshot,
            consistent_point: point,
            tables,
            types,
        });
        let task = tokio::spawn(worker.run(repl, client, backfill));
        Ok(Capture {
            events: rx,
            ready: Default::default(),
            ack: ack_tx,
            stop: stop_tx,
            task,
            reported: reported_rx,
            progress,
        })
    }

    /// The server's WAL end and what it was last told, for lag figures.
    pub fn progress(&self) -> Arc<ServerProgress> {
        self.progress.clone()
    }

    /// The next event; `Ok(None)` when the capture ended (stop position reached or
    /// shutdown requested).
    pub async fn next(&mut self) -> Result<Option<CaptureEvent>, SourceError> {
        if let Some(ev) = self.ready.pop_front() {
            return Ok(Some(ev));
        }
        match self.events.recv().await {
            Some(Ok(batch)) => {
                self.ready.extend(batch);
                Ok(self.ready.pop_front())
            }
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// Whether an event is waiting (a consumer can flush while there is none).
    pub fn has_pending(&self) -> bool {
        !self.ready.is_empty() || !self.events.is_empty()
    }

    /// Declares every change before `position` durable: PostgreSQL may discard its WAL.
    pub fn acknowledge(&self, position: Lsn) {
        self.ack.send_if_modified(|cur| {
            if position > *cur {
                *cur = position;
                true
            } else {
                false
            }
        });
    }

    /// Stops the capture after telling PostgreSQL the last acknowledged position.
    pub async fn shutdown(mut self) -> Result<(), SourceError> {
        let _ = self.stop.send(true);
        // Drain so that the worker is never stuck on a full channel.
        let drain = async {
            while let Some(ev) = self.events.recv().await {
                ev?;
            }
            Ok(())
        };
        let drained = drain.await;
        let ended = match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(SourceError::Protocol {
                lsn: *self.reported.borrow(),
                message: format!("capture task failed: {e}"),
            }),
        };
        drained.and(ended)
    }
}

/// Events on their way to the consumer, sent in batches: one channel operation per batch
/// instead of per row. A batch leaves when full and at every transaction boundary, so
/// batching adds no latency.
pub(crate) struct Outbox {
    tx: mpsc::Sender<Result<Vec<CaptureEvent>, SourceError>>,
    batch: Vec<CaptureEvent>,
}

/// Events per batch.
const BATCH: usize = 256;

impl Outbox {
    fn new(tx: mpsc::Sender<Result<Vec<CaptureEvent>, SourceError>>) -> Self {
        Outbox {
            tx,
            batch: Vec::with_capacity(BATCH),
        }
    }

    /// Queues an event; sends the batch when it is full.
    pub(crate) async fn push(&mut self, ev: CaptureEvent) -> Result<(), SourceError> {
        self.batch.push(ev);
        if self.batch.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends what is queued.
    pub(crate) async fn flush(&mut self) -> Result<(), SourceError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        self.tx
            .send(Ok(batch))
            .await
            .map_err(|_| SourceError::ConsumerGone)
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Ends the consumer's stream (it sees the end once it has read what was sent).
    fn close(&mut self) {
        let (closed, _) = mpsc::channel(1);
        self.tx = closed;
    }

    /// Sends what is queued, then the error that ended the capture.
    async fn fail(&mut self, e: SourceError) {
        let _ = self.flush().await;
        let _ = self.tx.send(Err(e)).await;
    }
}

/// Tables added since the consumer's last position, to copy at their own snapshot.
struct Adding {
    /// The temporary slot's session, which holds the snapshot until it is dropped.
    held: ReplicationClient,
    snapshot: String,
    /// The snapshot's consistent point.
    point: Lsn,
    tables: Vec<relation::TableInfo>,
    types: crate::decode::TypeRegistry,
    /// The stream's configuration to reopen it at `point` after the copy.
    reconnect: pgwire_replication::ReplicationConfig,
    settings: ConnectionSettings,
    /// What the consumer held at the start: the lowest position to report as applied.
    floor: Lsn,
    /// Tables whose changes before the copy are delivered all the same.
    streamed: Vec<u32>,
}

/// What the backfill needs: the exported snapshot and what was read about the tables.
struct Backfill {
    snapshot: String,
    consistent_point: Lsn,
    tables: Vec<relation::TableInfo>,
    types: crate::decode::TypeRegistry,
}

struct Worker {
    progress: Arc<ServerProgress>,
    slot: String,
    events: Outbox,
    ack: watch::Receiver<Lsn>,
    stop: watch::Receiver<bool>,
    reported: watch::Sender<Lsn>,
    builder: ChangeBuilder,
    /// Transactions that committed before this are skipped.
    resume_at: Lsn,
    /// What the consumer held at the start: skipped transactions up to it may be
    /// acknowledged at once.
    durable: Lsn,
    /// End of the last transaction delivered (or skipped).
    delivered: Lsn,
    /// Where to stop.
    stop_at: Option<Lsn>,
    /// Ends with an error when a captured table is dropped or leaves the publication.
    watcher: JoinHandle<SourceError>,
    /// The replication session waits at its gate (created the slot, not yet streaming):
    /// it cannot stop gracefully then, only be dropped.
    gated: bool,
    /// A SQL session for what Relation messages do not say (column numbers, values of
    /// rows older than an added column, types created since the start).
    catalog: Option<tokio_postgres::Client>,
    /// How often an idle position is offered, and the last one offered (and when).
    idle_interval: Duration,
    idle_offered: (Lsn, tokio::time::Instant),
    /// Changes delivered of the open transaction.
    txn_changes: usize,
    /// Tables to copy once the stream reaches their snapshot.
    adding: Option<Adding>,
    /// Tables whose changes are not delivered (they are copied later, at a snapshot
    /// that holds them).
    held_back: std::collections::HashSet<u32>,
    /// The stream returned because it reached `stop_at`.
    reached_stop: bool,
    /// How long the replication connection may stay silent before the server is asked
    /// whether it still hears us.
    receive_timeout: Option<Duration>,
    /// The connections that copy a large table beside the snapshot's own session.
    copiers: backfill::Copiers,
}

/// A replication connection attempt, given up after the connect timeout (the transport
/// has none of its own: through a network cut it would wait for ever).
async fn connect_within<T>(
    settings: &ConnectionSettings,
    connect: impl std::future::Future<Output = T>,
) -> Result<T, SourceError> {
    tokio::time::timeout(settings.connect_timeout, connect)
        .await
        .map_err(|_| SourceError::Unreachable {
            target: settings.target(),
            reason: format!(
                "the replication connection got no answer within {:?}",
                settings.connect_timeout
            ),
        })
}

impl Worker {
    async fn run(
        mut self,
        mut repl: ReplicationClient,
        client: tokio_postgres::Client,
        backfill: Option<Backfill>,
    ) -> Result<(), SourceError> {
        let result = self.run_inner(&mut repl, client, backfill).await;
        self.watcher.abort();
        if result.is_ok() && !*self.stop.borrow() {
            // The stop position was reached. The consumer still has to make the last
            // transactions durable and acknowledge them: end its stream, and keep the
            // connection until it shuts the capture down, so that acknowledgment reaches
            // PostgreSQL.
            if self.events.flush().await.is_ok() {
                self.events.close();
                let _ = self.stop.wait_for(|s| *s).await;
            }
        }
        self.finish(&mut repl).await;
        match result {
            // The consumer sees the error as its next event; when it is gone, whoever
            // awaits the task gets it.
            Err(e) if !self.events.is_closed() => {
                self.events.fail(e).await;
                Ok(())
            }
            other => other,
        }
    }

    async fn run_inner(
        &mut self,
        repl: &mut ReplicationClient,
        client: tokio_postgres::Client,
        backfill: Option<Backfill>,
    ) -> Result<(), SourceError> {
        if let Some(Backfill {
            snapshot,
            consistent_point,
            tables,
            types: registry,
        }) = backfill
        {
            let complete = backfill::copy_tables(
                &client,
                (&snapshot, consistent_point),
                &tables,
                &registry,
                &mut self.events,
                &self.stop,
                &self.copiers,
            )
            .await?;
            if !complete {
                // Shut down mid-copy: no BackfillDone, so the next start copies again.
                return Ok(());
            }
            self.events
                .push(CaptureEvent::BackfillDone {
                    position: consistent_point,
                })
                .await?;
            self.events.flush().await?;
            self.gated = false;
            repl.start()
                .await
                .map_err(|source| self.repl_error(source))?;
        }
        self.catalog = Some(client);
        if let Some(adding) = self.adding.take()
            && !self.add_tables(repl, adding).await?
        {
            return Ok(());
        }
        repl.wait_started()
            .await
            .map_err(|source| self.repl_error(source))?;
        let low_water = self.low_water().await;
        self.stream(repl, low_water).await
    }

    /// The replication socket's low-water mark (see `source/socket.rs`), where found.
    async fn low_water(&self) -> Option<socket::LowWater> {
        let client = self.catalog.as_ref()?;
        let found = socket::local_end(client, &self.slot)
            .await
            .and_then(|(local, server_port)| socket::LowWater::find(local, server_port));
        if found.is_none() {
            tracing::debug!(slot = %self.slot, "replication socket not found: no low-water mark");
        }
        found
    }

    /// Copies the tables added since the consumer's last position: streams up to their
    /// snapshot's point (the other tables' changes, none of theirs), closes the stream,
    /// copies them, and opens the stream again at that point, so that every change
    /// comes in order once. Returns `false` when the capture stopped before.
    async fn add_tables(
        &mut self,
        repl: &mut ReplicationClient,
        adding: Adding,
    ) -> Result<bool, SourceError> {
        let Adding {
            mut held,
            snapshot,
            point,
            tables,
            types,
            mut reconnect,
            settings,
            floor,
            streamed,
        } = adding;
        let result = async {
            repl.wait_started()
                .await
                .map_err(|source| self.repl_error(source))?;
            let low_water = self.low_water().await;
            // A stop before the snapshot's point moves to it: the copy cannot be older.
            let wanted = self.stop_at;
            self.stop_at = Some(point);
            self.held_back = tables
                .iter()
                .map(|t| t.oid)
                .filter(|oid| !streamed.contains(oid))
                .collect();
            self.reached_stop = false;
            let streamed = self.stream(repl, low_water).await;
            self.stop_at = wanted.map(|w| w.max(point));
            streamed?;
            if !self.reached_stop || *self.stop.borrow() {
                return Ok(false);
            }
            // A stream left unread through a long copy would time out on the server:
            // it is closed, and opened again at `point` afterwards.
            self.finish(repl).await;
            let client = self.catalog.take().expect("the catalog session is set");
            let copied = backfill::copy_tables(
                &client,
                (&snapshot, point),
                &tables,
                &types,
                &mut self.events,
                &self.stop,
                &self.copiers,
            )
            .await;
            self.catalog = Some(client);
            if !copied? {
                return Ok(false);
            }
            self.held_back.clear();
            self.events
                .push(CaptureEvent::TablesBackfilled {
                    position: point,
                    tables: tables.iter().map(|t| t.oid).collect(),
                })
                .await?;
            self.events.flush().await?;
            self.resume_at = point;
            self.delivered = self.delivered.max(point);
            // Nothing past what the consumer acknowledged is reported as applied.
            let acked = (*self.ack.borrow()).max(floor);
            reconnect.ack_lsn = Some(acked.into());
            *repl = connect_within(&settings, ReplicationClient::connect(reconnect))
                .await?
                .map_err(|source| self.repl_error(source))?;
            Ok(true)
        }
        .await;
        // The snapshot is no longer needed; the temporary slot goes with its session.
        held.abort();
        result
    }

    /// Learns types created after the start (an enum or a domain of a column added while
    /// streaming), so that their values get their kind without a restart.
    async fn load_types(
        &mut self,
        msg: &decode::Message<'_>,
        unknown: &[u32],
    ) -> Result<(), SourceError> {
        let (Some(client), decode::Message::Relation { id, .. }) = (&self.catalog, msg) else {
            return Ok(());
        };
        let types = setup::type_descriptions(client, &[*id]).await?;
        tracing::info!(oid = id, types = ?unknown, "read the catalog for types created since the start");
        self.builder.describe_types(&types);
        Ok(())
    }

    /// Adds what the catalog says about the relation's columns: their numbers (which tell
    /// a renamed column from a dropped and added one) and the value older rows have for a
    /// column added with a default. The catalog is read now, not as of the message: a
    /// column renamed or dropped again since has no number.
    async fn describe_columns(
        &self,
        rel: Arc<relation::Relation>,
    ) -> Result<Arc<relation::Relation>, SourceError> {
        let Some(client) = &self.catalog else {
            return Ok(rel);
        };
        let found = setup::catalog_columns(client, rel.oid).await?;
        let mut described = (*rel).clone();
        for c in &mut described.columns {
            // Same name and type: most likely the same column (a column of that name
            // dropped and added since is told apart only when its type differs).
            if let Some(f) = found
                .iter()
                .find(|f| *f.name == *c.name && f.type_id == c.type_id)
            {
                c.attnum = Some(f.attnum);
                c.has_default = f.has_default;
                c.missing = f.missing.as_deref().map(|text| {
                    let (value, exact) = decode::value::to_json_exact(&c.kind, text);
                    relation::Missing { value, exact }
                });
            }
        }
        // Where the rows are stored, when the catalog has the shape of the message (it
        // is read now: a later change of the table would pair the later storage with
        // this older shape).
        let current = described.columns.len() == found.len()
            && described.columns.iter().all(|c| {
                found.iter().any(|f| {
                    *f.name == *c.name
                        && f.type_id == c.type_id
                        && f.type_modifier == c.type_modifier
                })
            });
        if current {
            described.storage = Some(setup::storage_of(client, rel.oid).await?);
        }
        Ok(Arc::new(described))
    }

    fn repl_error(&self, source: pgwire_replication::PgWireError) -> SourceError {
        SourceError::Replication {
            slot: self.slot.clone(),
            source,
        }
    }

    fn forward_ack(&self, repl: &ReplicationClient) {
        let acked = *self.ack.borrow();
        if acked > Lsn::ZERO {
            repl.update_applied_lsn(acked.into());
        }
    }

    async fn stream(
        &mut self,
        repl: &mut ReplicationClient,
        mut low_water: Option<socket::LowWater>,
    ) -> Result<(), SourceError> {
        let mut txn: Option<(Transaction, bool)> = None;
        let idle = tokio::time::sleep(socket::IDLE_TICK);
        tokio::pin!(idle);
        // Events received, and their count at the last silence check.
        let (mut heard, mut checked) = (0u64, 0u64);
        let check_every = self.receive_timeout.unwrap_or(Duration::from_secs(3600));
        let silence = tokio::time::sleep(check_every);
        tokio::pin!(silence);
        loop {
            let raised = low_water.as_ref().is_some_and(|m| m.raised());
            let ev = tokio::select! {
                biased;
                _ = self.stop.changed() => return Ok(()),
                gone = &mut self.watcher => {
                    return Err(gone.unwrap_or_else(|e| SourceError::Protocol {
                        lsn: self.delivered,
                        message: format!("the catalog watch failed: {e}"),
                    }));
                }
                changed = self.ack.changed() => {
                    if changed.is_ok() {
                        self.forward_ack(repl);
                    }
                    continue;
                }
                ev = repl.recv() => ev.map_err(|source| self.repl_error(source))?,
                _ = idle.as_mut(), if raised => {
                    if let Some(mark) = low_water.as_mut() {
                        mark.on_tick();
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + socket::IDLE_TICK);
                    continue;
                }
                _ = silence.as_mut(), if self.receive_timeout.is_some() => {
                    if heard == checked {
                        self.check_heard(check_every).await?;
                    }
                    checked = heard;
                    silence.as_mut().reset(tokio::time::Instant::now() + check_every);
                    continue;
                }
            };
            heard += 1;
            if let Some(mark) = low_water.as_mut() {
                mark.on_event();
                if !raised && mark.raised() {
                    self.progress
                        .low_water_raises
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let Some(ev) = ev else { return Ok(()) };
            match ev {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    let lsn = Lsn::from(final_lsn);
                    if self.stop_at.is_some_and(|stop| lsn >= stop) {
                        self.reached_stop = true;
                        return Ok(());
                    }
                    let skip = lsn < self.resume_at;
                    self.txn_changes = 0;
                    if let Some(mark) = low_water.as_mut() {
                        mark.on_transaction(pg_time_to_unix_ms(commit_time_micros));
                    }
                    txn = Some((
                        Transaction {
                            lsn,
                            xid,
                            ts_ms: pg_time_to_unix_ms(commit_time_micros),
                            seq: 0,
                        },
                        skip,
                    ));
                }
                ReplicationEvent::XLogData {
                    data,
                    wal_start,
                    wal_end,
                    ..
                } => {
                    self.progress
                        .update(wal_end.0, repl.metrics().last_applied_lsn().0);
                    let msg = decode::decode(&data).map_err(|source| SourceError::Decode {
                        lsn: wal_start.into(),
                        source,
                    })?;
                    let unknown = self.builder.unknown_types(&msg);
                    if !unknown.is_empty() {
                        self.load_types(&msg, &unknown).await?;
                    }
                    let Some((t, skip)) = txn.as_mut() else {
                        // Relation messages may only come inside transactions; anything
                        // else outside one is a protocol violation worth stopping for.
                        return Err(SourceError::Protocol {
                            lsn: wal_start.into(),
                            message: "change outside a transaction".into(),
                        });
                    };
                    let decoded =
                        self.builder
                            .apply(msg, t)
                            .map_err(|message| SourceError::Protocol {
                                lsn: wal_start.into(),
                                message,
                            })?;
                    match (decoded, *skip) {
                        (Decoded::Documents(docs), false) => {
                            for doc in docs {
                                // Copied later, at a snapshot that holds this change.
                                if self.held_back.contains(&doc.source.oid) {
                                    continue;
                                }
                                self.txn_changes += 1;
                                self.events.push(CaptureEvent::Change(doc)).await?;
                            }
                        }
                        // Schemas go out also inside skipped transactions: later changes
                        // rely on them.
                        (Decoded::Schema(rel), _) => {
                            let rel = self.describe_columns(rel).await?;
                            self.events.push(CaptureEvent::Schema(rel)).await?;
                        }
                        _ => {}
                    }
                }
                ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                    let position = Lsn::from(end_lsn);
                    match txn.take() {
                        Some((_, true)) => {
                            // Durable downstream already: acknowledge right away (not
                            // one delivered in this session before the stream was
                            // reopened: the consumer acknowledges that itself).
                            tracing::debug!(lsn = %Lsn::from(lsn), "skipped a transaction delivered before the restart");
                            if position <= self.durable {
                                repl.update_applied_lsn(end_lsn);
                            }
                        }
                        // Nothing of it to deliver (changes of published tables that
                        // source.tables leaves out): no commit to record; an idle
                        // position covers it.
                        Some(_) if self.txn_changes == 0 => {}
                        _ => {
                            self.events
                                .push(CaptureEvent::Commit {
                                    lsn: lsn.into(),
                                    position,
                                })
                                .await?;
                            self.events.flush().await?;
                        }
                    }
                    self.delivered = self.delivered.max(position);
                    // Commits arrive in order and do not overlap: once one ends at or past
                    // the stop position, every transaction before it has been delivered.
                    if self.stop_at.is_some_and(|stop| position >= stop) {
                        self.reached_stop = true;
                        return Ok(());
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    self.progress
                        .update(wal_end.0, repl.metrics().last_applied_lsn().0);
                    if txn.is_none() && self.stop_at.is_some_and(|stop| Lsn::from(wal_end) >= stop)
                    {
                        self.reached_stop = true;
                        return Ok(());
                    }
                    // Idle: the server's position is offered to the consumer, which
                    // records it before acknowledging it (an acknowledgment the consumer
                    // has not recorded would look, at the next start, like someone else
                    // advancing the slot).
                    let wal_end = Lsn::from(wal_end);
                    let (offered, at) = self.idle_offered;
                    if txn.is_none()
                        && wal_end > offered.max(self.delivered)
                        && at.elapsed() >= self.idle_interval
                    {
                        self.idle_offered = (wal_end, tokio::time::Instant::now());
                        self.events
                            .push(CaptureEvent::Idle { position: wal_end })
                            .await?;
                        self.events.flush().await?;
                    }
                }
                ReplicationEvent::Message {
                    prefix,
                    content,
                    lsn,
                    ..
                } if prefix == resync::RESYNC_PREFIX => {
                    let lsn = Lsn::from(lsn);
                    let skip = match &txn {
                        Some((_, skip)) => *skip,
                        None => lsn < self.resume_at,
                    };
                    let Some(request) = resync::ResyncRequest::parse(&content) else {
                        tracing::warn!(%lsn, "ignored a `{prefix}` message that is not a resync request of weir's");
                        continue;
                    };
                    // Another pipeline's; or a table already being copied at a later
                    // snapshot (the copy holds what the request asked for).
                    if skip || request.slot != self.slot || self.held_back.contains(&request.oid) {
                        continue;
                    }
                    self.events
                        .push(CaptureEvent::Resync {
                            oid: request.oid,
                            table: request.table,
                            lsn,
                        })
                        .await?;
                    self.events.flush().await?;
                }
                ReplicationEvent::Message { .. } => {}
                ReplicationEvent::StoppedAt { .. } => return Ok(()),
            }
        }
    }

    /// After a silence of the replication connection: asks the server, over the catalog
    /// session, whether it still hears the connection. A silence alone proves nothing
    /// (an idle server sends nothing; a server decoding a large transaction sends nothing
    /// until its commit, while the transport keeps sending status updates); a walsender
    /// that is gone, or has not heard from us for as long, or a server that does not
    /// answer at all, means the connection is lost.
    async fn check_heard(&self, silent: Duration) -> Result<(), SourceError> {
        let Some(client) = &self.catalog else {
            return Ok(());
        };
        let lost = |why: String| SourceError::ConnectionLost {
            slot: self.slot.clone(),
            silent_s: silent.as_secs(),
            why,
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.slot];
        let query = client.query_opt(
            "SELECT s.active_pid IS NOT NULL, \
                    extract(epoch FROM now() - r.reply_time)::float8 \
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &params,
        );
        let row = match tokio::time::timeout(silent, query).await {
            Err(_) => {
                return Err(lost(format!(
                    "the server did not answer a query on another connection within {} s either",
                    silent.as_secs()
                )));
            }
            Ok(Err(e)) if e.as_db_error().is_none() => {
                return Err(lost(format!("the catalog connection failed too: {e}")));
            }
            Ok(Err(e)) => {
                // The server answers but refuses the question: it is there; trust the
                // transport and the server's own wal_sender_timeout.
                tracing::debug!(error = %e, "cannot check the replication connection");
                return Ok(());
            }
            Ok(Ok(row)) => row,
        };
        let Some(row) = row else {
            return Err(lost("the slot is gone".into()));
        };
        let active: bool = row.get(0);
        let heard_ago: Option<f64> = row.get(1);
        if !active {
            return Err(lost("the server has no connection on the slot".into()));
        }
        match heard_ago {
            Some(ago) if ago > silent.as_secs_f64() => Err(lost(format!(
                "the server last heard from it {ago:.0} s ago"
            ))),
            _ => {
                tracing::debug!(slot = %self.slot, "replication connection silent but alive");
                Ok(())
            }
        }
    }

    /// Sends the last acknowledged position and waits (bounded) until the worker has
    /// reported it, because the transport sends no status update when it stops.
    async fn finish(&self, repl: &mut ReplicationClient) {
        if self.gated {
            // Stopped (or failed) during the backfill: nothing was acknowledged, and a
            // graceful stop would wait at the gate for ever.
            repl.abort();
            return;
        }
        self.forward_ack(repl);
        let target = *self.ack.borrow();
        let metrics = repl.metrics();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while target > Lsn::ZERO
            && Lsn::from(metrics.last_applied_lsn()) < target
            && repl.is_running()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.reported.send(Lsn::from(metrics.last_applied_lsn()));
        let _ = repl.shutdown().await;
    }
}
