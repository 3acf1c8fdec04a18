//! The persistent job queue: one SQLite table (`DATA_DIR/ensueno.db`, WAL
//! mode, synchronous=FULL) that every accepted job is written to before the
//! client hears "accepted", so that a crash or `kill -9` loses none of them.
//!
//! On open, jobs left `running` by a crash go back to `queued`; the workers
//! take queued jobs in the order they were accepted. A job interrupted
//! [`MAX_ATTEMPTS`] times is failed rather than retried forever (a job that
//! crashes the server must not crash it on every restart).

use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};

use crate::jobs::{now, JobResult, JobRow, JobSpec, JobStatus};

/// How many times a job may be started before it is given up.
pub const MAX_ATTEMPTS: i64 = 3;

/// The job table behind a mutex (a `rusqlite::Connection` is not `Sync`;
/// every statement here is short).
pub struct Store {
    conn: Mutex<Connection>,
}

/// What [`Store::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Accepted; the job is `n`-th in the queue (0 = next).
    Queued(usize),
    /// The queue already holds this many jobs.
    Full(usize),
}

const COLUMNS: &str = "id, status, spec, created_at, started_at, finished_at, error, result";

impl Store {
    /// Opens (or creates) the database and re-queues interrupted jobs.
    /// Returns the store and how many jobs were re-queued.
    pub fn open(path: &Path) -> anyhow::Result<(Self, usize)> {
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open the job database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY,
                status TEXT NOT NULL,
                spec TEXT NOT NULL,
                created_at REAL NOT NULL,
                started_at REAL,
                finished_at REAL,
                error TEXT,
                result TEXT,
                attempts INTEGER NOT NULL DEFAULT 0
            );
            CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status);",
        )
        .with_context(|| format!("cannot create the jobs table in {}", path.display()))?;
        let requeued = conn.execute(
            "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'",
            [],
        )?;
        Ok((
            Self {
                conn: Mutex::new(conn),
            },
            requeued,
        ))
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (every
        // change is one statement or one transaction), so poisoning is ignored.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a queued job unless `max_queue` jobs are already waiting.
    pub fn insert(&self, id: &str, spec: &JobSpec, max_queue: usize) -> anyhow::Result<Insert> {
        let spec = serde_json::to_string(spec)?;
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let queued: i64 = tx.query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued'",
            [],
            |r| r.get(0),
        )?;
        let queued = queued.max(0) as usize;
        if queued >= max_queue {
            return Ok(Insert::Full(queued));
        }
        tx.execute(
            "INSERT INTO jobs (id, status, spec, created_at) VALUES (?1, 'queued', ?2, ?3)",
            params![id, spec, now()],
        )?;
        tx.commit()?;
        Ok(Insert::Queued(queued))
    }

    /// Marks the oldest queued job running and returns it. Jobs that already
    /// used up their attempts are failed on the way.
    pub fn claim_next(&self) -> anyhow::Result<Option<JobRow>> {
        let conn = self.conn();
        loop {
            let next: Option<(String, i64)> = conn
                .query_row(
                    "SELECT id, attempts FROM jobs WHERE status = 'queued' ORDER BY rowid LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((id, attempts)) = next else {
                return Ok(None);
            };
            if attempts >= MAX_ATTEMPTS {
                conn.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?2, error = ?3 WHERE id = ?1",
                    params![
                        id,
                        now(),
                        format!("the server stopped during this job {attempts} times; giving up")
                    ],
                )?;
                continue;
            }
            conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?2, attempts = attempts + 1
                 WHERE id = ?1 AND status = 'queued'",
                params![id, now()],
            )?;
            return Self::get_with(&conn, &id);
        }
    }

    pub fn finish_done(&self, id: &str, result: &JobResult) -> anyhow::Result<()> {
        let result = serde_json::to_string(result)?;
        self.conn().execute(
            "UPDATE jobs SET status = 'done', finished_at = ?2, result = ?3 WHERE id = ?1",
            params![id, now(), result],
        )?;
        Ok(())
    }

    pub fn finish_failed(&self, id: &str, error: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE jobs SET status = 'failed', finished_at = ?2, error = ?3 WHERE id = ?1",
            params![id, now(), error],
        )?;
        Ok(())
    }

    pub fn finish_cancelled(&self, id: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?2 WHERE id = ?1",
            params![id, now()],
        )?;
        Ok(())
    }

    /// Puts a running job back in the queue (the server is shutting down).
    pub fn requeue(&self, id: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE jobs SET status = 'queued', started_at = NULL, attempts = MAX(attempts - 1, 0)
             WHERE id = ?1 AND status = 'running'",
            params![id],
        )?;
        Ok(())
    }

    /// Cancels a job that has not started; false if it is not queued.
    pub fn cancel_queued(&self, id: &str) -> anyhow::Result<bool> {
        let n = self.conn().execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?2 WHERE id = ?1 AND status = 'queued'",
            params![id, now()],
        )?;
        Ok(n > 0)
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Option<JobRow>> {
        Self::get_with(&self.conn(), id)
    }

    fn get_with(conn: &Connection, id: &str) -> anyhow::Result<Option<JobRow>> {
        let row = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
                params![id],
                raw_row,
            )
            .optional()?;
        row.map(parse_row).transpose()
    }

    /// How many queued jobs were accepted before `id` (its place in line).
    pub fn position(&self, id: &str) -> anyhow::Result<usize> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = 'queued'
             AND rowid < (SELECT rowid FROM jobs WHERE id = ?1)",
            params![id],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as usize)
    }

    /// Jobs per status.
    pub fn count(&self, status: JobStatus) -> anyhow::Result<usize> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM jobs WHERE status = ?1",
            params![status.as_str()],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as usize)
    }

    /// Finished jobs with images, newest first: (total, page).
    pub fn gallery(&self, offset: usize, limit: usize) -> anyhow::Result<(usize, Vec<JobRow>)> {
        let conn = self.conn();
        let total: i64 =
            conn.query_row("SELECT COUNT(*) FROM jobs WHERE status = 'done'", [], |r| {
                r.get(0)
            })?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = 'done' ORDER BY rowid DESC LIMIT ?1 OFFSET ?2"
        ))?;
        let rows = stmt
            .query_map(params![limit as i64, offset as i64], raw_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let rows = rows
            .into_iter()
            .map(parse_row)
            .collect::<anyhow::Result<_>>()?;
        Ok((total.max(0) as usize, rows))
    }
}

type RawRow = (
    String,
    String,
    String,
    f64,
    Option<f64>,
    Option<f64>,
    Option<String>,
    Option<String>,
);

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn parse_row(raw: RawRow) -> anyhow::Result<JobRow> {
    let (id, status, spec, created_at, started_at, finished_at, error, result) = raw;
    let status = JobStatus::parse(&status)
        .with_context(|| format!("job {id} has an unknown status '{status}'"))?;
    let spec: JobSpec =
        serde_json::from_str(&spec).with_context(|| format!("job {id}: unreadable spec"))?;
    let result: Option<JobResult> = result
        .map(|r| serde_json::from_str(&r))
        .transpose()
        .with_context(|| format!("job {id}: unreadable result"))?;
    Ok(JobRow {
        id,
        status,
        spec,
        created_at,
        started_at,
        finished_at,
        error,
        result,
    })
}
