//! Durable state in SQLite under the data directory: every session (kept
//! after it ends, with its metering and scrub) and every guest agentd has
//! started, so that a restart after a crash can find and clean what the
//! previous run left.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use control_api::api::SessionInfo;
use rusqlite::{params, Connection, OptionalExtension};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// A stored record does not decode (written by another version?).
    #[error("state database {path}: record {id} does not decode: {message}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The record.
        id: String,
        /// Why.
        message: String,
    },
}

/// A guest as recorded for crash recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRecord {
    /// Guest id (also its directory name).
    pub id: String,
    /// `microvm` or `namespace`.
    pub backend: String,
    /// The process agentd spawned (vmm or warren-nsinit).
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field
    /// 22), so a recycled pid is never mistaken for it.
    pub pid_start: u64,
    /// Its directory.
    pub dir: PathBuf,
    /// The session bound to it, if any.
    pub session_id: Option<String>,
}

/// The database.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating) `<data_dir>/agentd.sqlite`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join("agentd.sqlite");
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        // WAL: readers never wait for the writer; NORMAL sync is durable
        // across an agentd crash (not a power cut), which is what recovery
        // needs.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             PRAGMA foreign_keys = ON;
             CREATE TABLE IF NOT EXISTS sessions (
                 id TEXT PRIMARY KEY,
                 state TEXT NOT NULL,
                 created_at_ms INTEGER NOT NULL,
                 record TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS sessions_by_created ON sessions (created_at_ms);
             CREATE TABLE IF NOT EXISTS guests (
                 id TEXT PRIMARY KEY,
                 backend TEXT NOT NULL,
                 pid INTEGER NOT NULL,
                 pid_start INTEGER NOT NULL,
                 dir TEXT NOT NULL,
                 session_id TEXT
             );
             CREATE TABLE IF NOT EXISTS runtimes (
                 name TEXT PRIMARY KEY,
                 created_at_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS runtime_versions (
                 name TEXT NOT NULL REFERENCES runtimes (name) ON DELETE CASCADE,
                 version INTEGER NOT NULL,
                 record TEXT NOT NULL,
                 PRIMARY KEY (name, version)
             );
             CREATE TABLE IF NOT EXISTS runtime_endpoints (
                 name TEXT NOT NULL REFERENCES runtimes (name) ON DELETE CASCADE,
                 endpoint TEXT NOT NULL,
                 version INTEGER NOT NULL,
                 PRIMARY KEY (name, endpoint)
             );",
        )
        .map_err(err)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Inserts or replaces a session record.
    pub fn put_session(&self, s: &SessionInfo) -> Result<(), StoreError> {
        let record = serde_json::to_string(s).unwrap_or_default();
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO sessions (id, state, created_at_ms, record) VALUES (?1, ?2, ?3, ?4)",
                params![s.id, s.state.as_str(), s.created_at_ms as i64, record],
            )
            .map(|_| ())
        })
    }

    /// One session.
    pub fn session(&self, id: &str) -> Result<Option<SessionInfo>, StoreError> {
        let rec: Option<String> = self.with(|c| {
            c.query_row("SELECT record FROM sessions WHERE id = ?1", [id], |r| r.get(0))
                .optional()
        })?;
        rec.map(|r| self.decode(id, &r)).transpose()
    }

    /// The newest `limit` sessions, newest first.
    pub fn sessions(&self, limit: u32) -> Result<Vec<SessionInfo>, StoreError> {
        let rows: Vec<(String, String)> = self.with(|c| {
            let mut st = c.prepare("SELECT id, record FROM sessions ORDER BY created_at_ms DESC LIMIT ?1")?;
            let rows = st.query_map([limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter().map(|(id, r)| self.decode(id, r)).collect()
    }

    /// Sessions not marked ended (after a crash: the ones to close).
    pub fn unfinished_sessions(&self) -> Result<Vec<SessionInfo>, StoreError> {
        let rows: Vec<(String, String)> = self.with(|c| {
            let mut st = c.prepare("SELECT id, record FROM sessions WHERE state != 'ended'")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })?;
        rows.iter().map(|(id, r)| self.decode(id, r)).collect()
    }

    fn decode(&self, id: &str, record: &str) -> Result<SessionInfo, StoreError> {
        serde_json::from_str(record).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            id: id.into(),
            message: e.to_string(),
        })
    }

    /// Records a guest before its process can outlive us.
    pub fn put_guest(&self, g: &GuestRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO guests (id, backend, pid, pid_start, dir, session_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    g.id,
                    g.backend,
                    g.pid,
                    g.pid_start as i64,
                    g.dir.to_string_lossy(),
                    g.session_id
                ],
            )
            .map(|_| ())
        })
    }

    /// Binds a recorded guest to a session.
    pub fn bind_guest(&self, guest_id: &str, session_id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE guests SET session_id = ?2 WHERE id = ?1",
                params![guest_id, session_id],
            )
            .map(|_| ())
        })
    }

    /// Forgets a guest that is gone.
    pub fn remove_guest(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| c.execute("DELETE FROM guests WHERE id = ?1", [id]).map(|_| ()))
    }

    /// Every recorded guest.
    pub fn guests(&self) -> Result<Vec<GuestRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT id, backend, pid, pid_start, dir, session_id FROM guests")?;
            let rows = st.query_map([], |r| {
                Ok(GuestRecord {
                    id: r.get(0)?,
                    backend: r.get(1)?,
                    pid: r.get(2)?,
                    pid_start: r.get::<_, i64>(3)? as u64,
                    dir: PathBuf::from(r.get::<_, String>(4)?),
                    session_id: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_api::api::{Metering, SessionState};

    fn info(id: &str, state: SessionState, created: u64) -> SessionInfo {
        SessionInfo {
            id: id.into(),
            state,
            backend: "namespace".into(),
            isolation: "x".into(),
            image: "base".into(),
            vcpus: 1,
            memory_mib: 256,
            idle_timeout_s: 900,
            max_lifetime_s: 28_800,
            created_at_ms: created,
            last_active_ms: created,
            ended_at_ms: None,
            end_reason: None,
            metering: Metering::default(),
            scrub: None,
            handout_ms: 0.5,
            from_pool: true,
            boot_ms: 0.0,
            guest_id: "g1".into(),
            guest_pid: 42,
            runtime: None,
            runtime_version: None,
        }
    }

    #[test]
    fn sessions_and_guests_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_session(&info("a", SessionState::Running, 1)).unwrap();
            s.put_session(&info("b", SessionState::Ended, 2)).unwrap();
            s.put_guest(&GuestRecord {
                id: "g1".into(),
                backend: "microvm".into(),
                pid: 42,
                pid_start: 7,
                dir: "/run/warren/vm/g1".into(),
                session_id: None,
            })
            .unwrap();
            s.bind_guest("g1", "a").unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let all = s.sessions(10).unwrap();
        assert_eq!(all.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        let open = s.unfinished_sessions().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].id, "a");
        let g = s.guests().unwrap();
        assert_eq!(g[0].session_id.as_deref(), Some("a"));
        s.remove_guest("g1").unwrap();
        assert!(s.guests().unwrap().is_empty());
        assert!(s.session("zzz").unwrap().is_none());
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.with(|c| c.execute("INSERT INTO sessions VALUES ('x', 'ended', 1, 'not json')", []))
            .unwrap();
        let e = s.session("x").unwrap_err().to_string();
        assert!(e.contains("record x"), "{e}");
    }
}
