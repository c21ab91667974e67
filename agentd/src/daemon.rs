//! The daemon's core: pools, sessions, capacity, metering and teardown,
//! and the [`control_api::Node`] the HTTP routes call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use control_api::api::*;
use control_api::ApiError;

use crate::backend::{pid_start_time, Backends, Guest, PoolKey};
use crate::config::{BackendKind, Config};
use crate::metrics::{BackendLabels, HandoutLabels, Metrics, PoolLabels, ReasonLabel, StateLabel};
use crate::pool::Pool;
use crate::runtimes;
use crate::session::{now_ms, Session};
use crate::store::{GuestRecord, Store};

pub(crate) mod code;
mod exec;
mod images;
mod interpreter;
mod invoke;

/// How often live metering is sampled and timeouts are checked.
const TICK: Duration = Duration::from_millis(500);

/// The daemon. Cheap to clone: every clone is the same daemon.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Config,
    backends: Backends,
    store: Store,
    metrics: Metrics,
    pools: Vec<Arc<Pool>>,
    capacity: Mutex<Reserved>,
    max_memory_mib: u64,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    draining: AtomicBool,
    /// Refill loops still running (drain waits for them to see it).
    refillers: AtomicU32,
    /// (runtime, client session id) → session, for invocation affinity.
    affinity: Mutex<HashMap<(String, String), String>>,
    /// Imported images.
    image_store: crate::image_store::ImageStore,
    /// Imports in progress, by name (two imports of one name must not race).
    importing: Mutex<std::collections::HashSet<String>>,
}

#[derive(Default)]
struct Reserved {
    guests: u32,
    memory_mib: u64,
}

/// Random lowercase hex of `bytes` random bytes.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if getrandom::fill(&mut buf).is_err() {
        // No entropy source is a broken host; ids must still be unique.
        let t = crate::session::mono_ns() ^ u64::from(std::process::id());
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (t >> ((i % 8) * 8)) as u8);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Daemon {
    /// Builds the daemon and starts its background tasks (pool refillers,
    /// metering and timeouts). Call within a tokio runtime.
    pub fn start(cfg: Config, backends: Backends, store: Store) -> Daemon {
        let pools = cfg
            .pool
            .iter()
            .map(|p| {
                Arc::new(Pool::new(
                    PoolKey {
                        image: p.image.clone(),
                        vcpus: p.vcpus,
                        memory_mib: p.memory_mib,
                    },
                    p.target,
                    p.refill_concurrency,
                ))
            })
            .collect();
        let metrics = Metrics::default();
        metrics
            .backend_info
            .get_or_create(&BackendLabels {
                backend: backends.kind.as_str().into(),
                isolation: backends.kind.isolation().into(),
            })
            .set(1);
        let image_store = crate::image_store::ImageStore::new(&cfg);
        images::register_stored(&image_store, &backends);
        let d = Daemon {
            inner: Arc::new(Inner {
                max_memory_mib: cfg.max_memory_mib(),
                image_store,
                importing: Mutex::new(Default::default()),
                cfg,
                backends,
                store,
                metrics,
                pools,
                capacity: Mutex::new(Reserved::default()),
                sessions: Mutex::new(HashMap::new()),
                draining: AtomicBool::new(false),
                refillers: AtomicU32::new(0),
                affinity: Mutex::new(HashMap::new()),
            }),
        };
        for pool in &d.inner.pools {
            d.inner.refillers.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(d.clone().refill(pool.clone()));
        }
        tokio::spawn(d.clone().ticker());
        d
    }

    /// The backend new sessions get.
    pub fn backend(&self) -> BackendKind {
        self.inner.backends.kind
    }

    /// The pools.
    pub fn pool_list(&self) -> &[Arc<Pool>] {
        &self.inner.pools
    }

    fn reserve(&self, memory_mib: u32) -> bool {
        let mut c = self.inner.capacity.lock().unwrap_or_else(|p| p.into_inner());
        if c.guests + 1 > self.inner.cfg.capacity.max_guests
            || c.memory_mib + u64::from(memory_mib) > self.inner.max_memory_mib
        {
            return false;
        }
        c.guests += 1;
        c.memory_mib += u64::from(memory_mib);
        true
    }

    fn release(&self, memory_mib: u32) {
        {
            let mut c = self.inner.capacity.lock().unwrap_or_else(|p| p.into_inner());
            c.guests = c.guests.saturating_sub(1);
            c.memory_mib = c.memory_mib.saturating_sub(u64::from(memory_mib));
        }
        for p in &self.inner.pools {
            p.wake.notify_one();
        }
    }

    /// Boots one guest (capacity already reserved), recording it so that a
    /// restart can clean it up should agentd die.
    async fn boot_guest(&self, key: &PoolKey) -> Result<Arc<Guest>, String> {
        let id = format!("g{}", random_hex(6));
        let store = &self.inner.store;
        let dir_of = |kind: BackendKind| match kind {
            BackendKind::Microvm => self.inner.cfg.runtime_dir.join("vm").join(&id),
            BackendKind::Namespace => self.inner.cfg.runtime_dir.join("ns").join(&id),
        };
        let kind = self.inner.backends.kind;
        let record = |pid: u32| {
            let r = GuestRecord {
                id: id.clone(),
                backend: kind.as_str().into(),
                pid,
                pid_start: pid_start_time(pid).unwrap_or(0),
                dir: dir_of(kind),
                session_id: None,
            };
            if let Err(e) = store.put_guest(&r) {
                tracing::error!(error = %e, guest = %id, "cannot record the guest");
            }
        };
        match self.inner.backends.boot(&id, key, record).await {
            Ok(g) => {
                self.inner.metrics.boot_seconds.observe(g.boot_time.as_secs_f64());
                tracing::info!(guest = %id, backend = kind.as_str(), pid = g.pid, boot_ms = g.boot_time.as_secs_f64() * 1e3, agent = %g.hello.agent, "guest ready");
                Ok(Arc::new(g))
            }
            Err(e) => {
                let _ = store.remove_guest(&id);
                self.inner.metrics.boot_failures.inc();
                tracing::warn!(guest = %id, error = %e, "guest boot failed");
                Err(e.to_string())
            }
        }
    }

    /// Ends a guest that serves no session (pool drain, died while ready).
    async fn discard(&self, g: Arc<Guest>) {
        if let Err(e) = g.teardown().await {
            tracing::warn!(guest = %g.id, error = %e, "teardown of an unused guest");
        }
        let _ = self.inner.store.remove_guest(&g.id);
        self.release(g.key.memory_mib);
    }

    /// Keeps one pool at its target.
    async fn refill(self, pool: Arc<Pool>) {
        loop {
            if self.inner.draining.load(Ordering::Acquire) {
                self.inner.refillers.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            let failures = pool.consecutive_failures();
            if failures > 0 {
                // Back off on a failing image (missing kernel, broken
                // config): 0.5 s doubling to 30 s, so the log says it
                // clearly without spinning.
                let wait = Duration::from_millis(500u64 << failures.min(6)).min(Duration::from_secs(30));
                tokio::time::sleep(wait).await;
            }
            if pool.wants_boot() && self.reserve(pool.key.memory_mib) {
                pool.boot_started();
                let (d, p) = (self.clone(), pool.clone());
                tokio::spawn(async move {
                    match d.boot_guest(&p.key).await {
                        Ok(g) if d.inner.draining.load(Ordering::Acquire) => {
                            // Discard before counting the boot as over:
                            // drain waits for the count.
                            d.discard(g).await;
                            p.boot_ended(None);
                        }
                        Ok(g) => {
                            p.put(g);
                            p.boot_ended(None);
                        }
                        Err(e) => {
                            d.release(p.key.memory_mib);
                            p.boot_ended(Some(e));
                        }
                    }
                });
                continue;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), pool.wake.notified()).await;
        }
    }

    /// Samples metering and enforces idle timeouts and maximum lifetimes.
    async fn ticker(self) {
        let mut persist_every = 0u32;
        loop {
            tokio::time::sleep(TICK).await;
            let sessions: Vec<Arc<Session>> = self.sessions_snapshot();
            let now = now_ms();
            persist_every = (persist_every + 1) % 10;
            for s in sessions {
                s.sample();
                let info = s.snapshot();
                if info.state != SessionState::Running {
                    continue;
                }
                let idle = now.saturating_sub(info.last_active_ms) > info.idle_timeout_s.saturating_mul(1000)
                    && s.busy.load(Ordering::Acquire) == 0;
                let old = now.saturating_sub(info.created_at_ms) > info.max_lifetime_s.saturating_mul(1000);
                let reason = if old {
                    Some("max_lifetime")
                } else if idle {
                    Some("idle_timeout")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let d = self.clone();
                    tokio::spawn(async move { d.end_session(&info.id, reason).await });
                } else if persist_every == 0 {
                    // Live metering reaches the database every few
                    // seconds, so a crash loses little of it.
                    let _ = self.inner.store.put_session(&info);
                }
            }
        }
    }

    fn sessions_snapshot(&self) -> Vec<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn live(&self, id: &str) -> Option<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The live session `id`, or the error to answer: 409 if it ended,
    /// 404 if it never existed.
    fn running(&self, id: &str) -> Result<Arc<Session>, ApiError> {
        if let Some(s) = self.live(id) {
            if s.snapshot().state == SessionState::Running {
                return Ok(s);
            }
            return Err(ApiError::conflict(format!("session {id} is ending")));
        }
        match self.inner.store.session(id) {
            Ok(Some(s)) => Err(ApiError::conflict(format!(
                "session {id} has ended ({})",
                s.end_reason.as_deref().unwrap_or("unknown reason")
            ))),
            Ok(None) => Err(ApiError::not_found(format!("no session {id}"))),
            Err(e) => Err(ApiError::internal(e.to_string())),
        }
    }

    /// Ends a session: final metering sample, teardown with scrub, final
    /// record. Concurrent calls wait for the first one; the result is the
    /// final record.
    pub async fn end_session(&self, id: &str, reason: &str) -> Result<SessionInfo, ApiError> {
        let Some(s) = self.live(id) else {
            return match self.inner.store.session(id) {
                Ok(Some(info)) => Ok(info),
                Ok(None) => Err(ApiError::not_found(format!("no session {id}"))),
                Err(e) => Err(ApiError::internal(e.to_string())),
            };
        };
        if !s.begin_end() {
            let mut ended = s.ended.clone();
            let _ = ended.wait_for(|e| *e).await;
            return Ok(s.snapshot());
        }
        let _ = self.inner.store.put_session(&s.snapshot());
        // The last sample while every thread of the guest still exists.
        s.sample();
        let scrub = match s.guest.teardown().await {
            Ok(scrub) => scrub,
            Err(e) => {
                tracing::error!(session = %id, guest = %s.guest.id, error = %e, "teardown failed");
                None
            }
        };
        let _ = self.inner.store.remove_guest(&s.guest.id);
        self.release(s.guest.key.memory_mib);
        let info = {
            let mut info = s.info.lock().unwrap_or_else(|p| p.into_inner());
            info.state = SessionState::Ended;
            info.ended_at_ms = Some(now_ms());
            info.end_reason = Some(reason.to_string());
            info.scrub = scrub;
            info.last_active_ms = s.last_active_ms.load(Ordering::Relaxed);
            info.clone()
        };
        if let Err(e) = self.inner.store.put_session(&info) {
            tracing::error!(session = %id, error = %e, "cannot store the final record");
        }
        let m = &self.inner.metrics;
        m.sessions_ended
            .get_or_create(&ReasonLabel { reason: reason.into() })
            .inc();
        m.metered_cpu_seconds.inc_by(info.metering.cpu_ns as f64 / 1e9);
        m.metered_memory_gib_seconds.inc_by(info.metering.memory_gib_s);
        if let Some(sc) = scrub {
            m.scrubbed_bytes.inc_by(sc.bytes);
        }
        self.inner.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        s.mark_ended();
        tracing::info!(
            session = %id,
            reason,
            cpu_ms = info.metering.cpu_ns as f64 / 1e6,
            memory_gib_s = info.metering.memory_gib_s,
            scrub_bytes = scrub.map(|s| s.bytes),
            "session ended"
        );
        Ok(info)
    }

    /// Drain for stop: refuse new sessions, end the running ones, end the
    /// pools' guests, wait for boots in flight.
    pub async fn drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
        tracing::info!("draining: refusing new sessions, ending the running ones");
        let ids: Vec<String> = self.sessions_snapshot().iter().map(|s| s.snapshot().id).collect();
        let mut ends = tokio::task::JoinSet::new();
        for id in ids {
            let d = self.clone();
            ends.spawn(async move { d.end_session(&id, "drain").await });
        }
        while ends.join_next().await.is_some() {}
        for p in &self.inner.pools {
            p.wake.notify_waiters();
        }
        let deadline = Instant::now() + Duration::from_secs(self.inner.cfg.boot_timeout_s + 5);
        loop {
            let mut unused = Vec::new();
            for p in &self.inner.pools {
                unused.extend(p.take_all());
            }
            let mut discards = tokio::task::JoinSet::new();
            for g in unused {
                let d = self.clone();
                discards.spawn(async move { d.discard(g).await });
            }
            while discards.join_next().await.is_some() {}
            let idle = self.inner.refillers.load(Ordering::Acquire) == 0
                && self.inner.pools.iter().all(|p| p.booting() == 0 && p.ready() == 0);
            if idle || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(ns) = self.inner.backends.namespace() {
            let n = tokio::task::block_in_place(|| ns.release_images());
            if n > 0 {
                tracing::info!(count = n, "unmounted the images' root file systems");
            }
        }
        tracing::info!("drained");
    }

    /// The port of the code interpreter of the session's image, if any.
    fn interpreter_port(&self, s: &Session) -> Option<u16> {
        self.inner
            .backends
            .image(&s.snapshot().image)
            .and_then(|i| i.interpreter_port)
    }

    /// A running code-interpreter session.
    fn code_session(&self, id: &str) -> Result<Arc<Session>, ApiError> {
        let s = self.running(id)?;
        if !s.code_interpreter.load(Ordering::Acquire) {
            return Err(ApiError::not_found(format!("{id} is not a code-interpreter session")));
        }
        Ok(s)
    }

    fn key_for(&self, req: &CreateSession) -> Result<(PoolKey, u64, u64), ApiError> {
        let d = &self.inner.cfg.sessions;
        let image = req.image.clone().unwrap_or_else(|| d.image.clone());
        if !self.inner.backends.has_image(&image) {
            return Err(ApiError::not_found(format!("no image {image:?} on this node")));
        }
        // Unless asked otherwise, a session of an image that is not the
        // default one gets the shape of that image's first pool, so that it
        // is a warm handout (a python session: the python pool's 512 MiB).
        let pooled = (image != d.image)
            .then(|| self.inner.pools.iter().find(|p| p.key.image == image))
            .flatten()
            .map(|p| (p.key.vcpus, p.key.memory_mib));
        let vcpus = req.vcpus.or(pooled.map(|p| p.0)).unwrap_or(d.vcpus);
        if vcpus == 0 || vcpus > d.max_vcpus {
            return Err(ApiError::bad_request(format!(
                "vcpus {vcpus} is outside 1..={}",
                d.max_vcpus
            )));
        }
        let memory_mib = req.memory_mib.or(pooled.map(|p| p.1)).unwrap_or(d.memory_mib);
        if !(16..=d.max_memory_mib).contains(&memory_mib) {
            return Err(ApiError::bad_request(format!(
                "memory_mib {memory_mib} is outside 16..={}",
                d.max_memory_mib
            )));
        }
        let idle = req.idle_timeout_s.unwrap_or(d.idle_timeout_s);
        let life = req.max_lifetime_s.unwrap_or(d.max_lifetime_s);
        for (name, v) in [("idle_timeout_s", idle), ("max_lifetime_s", life)] {
            if v == 0 || v > 30 * 86_400 {
                return Err(ApiError::bad_request(format!("{name} {v} is outside 1..=2592000")));
            }
        }
        Ok((
            PoolKey {
                image,
                vcpus,
                memory_mib,
            },
            idle,
            life,
        ))
    }

    /// A session of a runtime takes every setting from the version its
    /// endpoint serves.
    fn runtime_request(&self, req: CreateSession) -> Result<(CreateSession, Option<RuntimeVersion>), ApiError> {
        let Some(name) = req.runtime.clone() else {
            if req.endpoint.is_some() {
                return Err(ApiError::bad_request("endpoint needs runtime"));
            }
            return Ok((req, None));
        };
        if req.image.is_some()
            || req.vcpus.is_some()
            || req.memory_mib.is_some()
            || req.idle_timeout_s.is_some()
            || req.max_lifetime_s.is_some()
        {
            return Err(ApiError::bad_request(format!(
                "a session of runtime {name} takes image, vcpus, memory_mib and timeouts from the runtime's version: leave them out"
            )));
        }
        let endpoint = req.endpoint.as_deref().unwrap_or(runtimes::DEFAULT_ENDPOINT);
        let v = runtimes::resolve(&self.inner.store, &name, endpoint)?;
        Ok((Self::session_request_of(&v), Some(v)))
    }

    /// The session settings a runtime version fixes.
    fn session_request_of(v: &RuntimeVersion) -> CreateSession {
        CreateSession {
            image: Some(v.image.clone()),
            vcpus: Some(v.vcpus),
            memory_mib: Some(v.memory_mib),
            idle_timeout_s: Some(v.idle_timeout_s),
            max_lifetime_s: Some(v.max_lifetime_s),
            runtime: None,
            endpoint: None,
        }
    }

    /// Resolves a runtime spec against the node's defaults and limits.
    fn resolve_spec(&self, runtime: &str, version: u32, spec: RuntimeSpec) -> Result<RuntimeVersion, ApiError> {
        runtimes::check_env(&spec.env)?;
        if let Some(c) = &spec.command {
            if c.is_empty() || c[0].is_empty() || c.iter().any(|a| a.contains('\0')) {
                return Err(ApiError::bad_request("command must name a program, without NUL bytes"));
            }
        }
        let (key, idle, life) = self.key_for(&CreateSession {
            image: spec.image,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            idle_timeout_s: spec.idle_timeout_s,
            max_lifetime_s: spec.max_lifetime_s,
            runtime: None,
            endpoint: None,
        })?;
        let command = spec
            .command
            .or_else(|| self.inner.backends.image(&key.image).and_then(|i| i.agent_command));
        Ok(runtimes::version_record(
            runtime, version, &key, spec.env, idle, life, command,
        ))
    }

    async fn create(&self, req: CreateSession) -> Result<SessionInfo, ApiError> {
        let (req, runtime) = self.runtime_request(req)?;
        self.create_resolved(req, runtime).await
    }

    /// Creates a session whose runtime version, if any, is already resolved.
    async fn create_resolved(
        &self,
        req: CreateSession,
        runtime: Option<RuntimeVersion>,
    ) -> Result<SessionInfo, ApiError> {
        let started = Instant::now();
        if self.inner.draining.load(Ordering::Acquire) {
            return Err(ApiError::unavailable("agentd is draining: no new sessions"));
        }
        let (key, idle_timeout_s, max_lifetime_s) = self.key_for(&req)?;
        let pool = self.inner.pools.iter().find(|p| p.key == key).cloned();
        let (taken, dead) = match &pool {
            Some(p) => p.take(),
            None => (None, Vec::new()),
        };
        for g in dead {
            tracing::warn!(guest = %g.id, "a ready guest died in its pool");
            let d = self.clone();
            tokio::spawn(async move { d.discard(g).await });
        }
        let (guest, from_pool) = match taken {
            Some(g) => (g, true),
            None => {
                if !self.reserve(key.memory_mib) {
                    self.inner.metrics.capacity_rejections.inc();
                    let retry = self.inner.cfg.capacity.retry_after_s;
                    return Err(ApiError::capacity(
                        format!(
                            "this node is at capacity ({} guests, {} MiB): retry in {retry} s",
                            self.inner.cfg.capacity.max_guests, self.inner.max_memory_mib
                        ),
                        retry,
                    ));
                }
                match self.boot_guest(&key).await {
                    Ok(g) => (g, false),
                    Err(e) => {
                        self.release(key.memory_mib);
                        return Err(ApiError::unavailable(format!("booting a guest failed: {e}")));
                    }
                }
            }
        };
        let id = format!("ses-{}", random_hex(12));
        let now = now_ms();
        let kind = guest.kind;
        let info = SessionInfo {
            id: id.clone(),
            state: SessionState::Running,
            backend: kind.as_str().into(),
            isolation: kind.isolation().into(),
            image: key.image.clone(),
            vcpus: key.vcpus,
            memory_mib: key.memory_mib,
            idle_timeout_s,
            max_lifetime_s,
            created_at_ms: now,
            last_active_ms: now,
            ended_at_ms: None,
            end_reason: None,
            metering: Metering::default(),
            scrub: None,
            handout_ms: started.elapsed().as_secs_f64() * 1e3,
            from_pool,
            boot_ms: if from_pool {
                0.0
            } else {
                guest.boot_time.as_secs_f64() * 1e3
            },
            guest_id: guest.id.clone(),
            guest_pid: guest.pid,
            runtime: runtime.as_ref().map(|v| v.runtime.clone()),
            runtime_version: runtime.as_ref().map(|v| v.version),
        };
        let session = Arc::new(Session::new(info, guest.clone(), runtime));
        session.sample();
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), session.clone());
        if let Err(e) = self
            .inner
            .store
            .put_session(&session.snapshot())
            .and_then(|_| self.inner.store.bind_guest(&guest.id, &id))
        {
            tracing::error!(error = %e, "cannot store the new session; ending it");
            let _ = self.end_session(&id, "store_failed").await;
            return Err(ApiError::unavailable(format!("state database: {e}")));
        }
        // A guest that dies under its session ends the session.
        let d = self.clone();
        let (sid, g) = (id.clone(), guest.clone());
        tokio::spawn(async move {
            g.exited().await;
            let reason = match g.kind {
                BackendKind::Microvm => "vmm_crashed",
                BackendKind::Namespace => "sandbox_crashed",
            };
            if d.live(&sid)
                .is_some_and(|s| s.snapshot().state == SessionState::Running)
            {
                tracing::warn!(session = %sid, guest = %g.id, "the guest's process ended under its session");
                let _ = d.end_session(&sid, reason).await;
            }
        });
        let handout = started.elapsed();
        self.inner
            .metrics
            .handout_seconds
            .get_or_create(&HandoutLabels {
                source: if from_pool { "pool" } else { "on_demand" }.into(),
            })
            .observe(handout.as_secs_f64());
        tracing::info!(session = %id, guest = %guest.id, from_pool, handout_ms = handout.as_secs_f64() * 1e3, "session bound");
        let mut info = session.snapshot();
        info.handout_ms = handout.as_secs_f64() * 1e3;
        Ok(info)
    }
}

impl control_api::Node for Daemon {
    async fn create_session(&self, req: CreateSession) -> Result<SessionInfo, ApiError> {
        self.create(req).await
    }

    fn list_sessions(&self) -> Result<Vec<SessionInfo>, ApiError> {
        let mut stored = self
            .inner
            .store
            .sessions(1000)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let live: HashMap<String, SessionInfo> = self
            .sessions_snapshot()
            .iter()
            .map(|s| {
                let i = s.snapshot();
                (i.id.clone(), i)
            })
            .collect();
        for s in stored.iter_mut() {
            if let Some(l) = live.get(&s.id) {
                *s = l.clone();
            }
        }
        Ok(stored)
    }

    fn get_session(&self, id: &str) -> Result<SessionInfo, ApiError> {
        if let Some(s) = self.live(id) {
            // A fresh sample: the caller may be checking the meter.
            s.sample();
            return Ok(s.snapshot());
        }
        match self.inner.store.session(id) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(ApiError::not_found(format!("no session {id}"))),
            Err(e) => Err(ApiError::internal(e.to_string())),
        }
    }

    async fn delete_session(&self, id: String) -> Result<SessionInfo, ApiError> {
        if self.live(&id).is_none() {
            return match self.inner.store.session(&id) {
                Ok(Some(s)) => Err(ApiError::conflict(format!(
                    "session {id} has already ended ({})",
                    s.end_reason.as_deref().unwrap_or("unknown reason")
                ))),
                Ok(None) => Err(ApiError::not_found(format!("no session {id}"))),
                Err(e) => Err(ApiError::internal(e.to_string())),
            };
        }
        self.end_session(&id, "deleted").await
    }

    async fn exec(&self, id: String, req: ExecBody) -> Result<(ExecResult, GuestTiming), ApiError> {
        let s = self.running(&id)?;
        exec::run(&s, req).await
    }

    async fn exec_stream(&self, id: String, req: ExecBody) -> Result<tokio::sync::mpsc::Receiver<ExecEvent>, ApiError> {
        let s = self.running(&id)?;
        exec::stream(s, req).await
    }

    fn create_runtime(&self, req: CreateRuntime) -> Result<RuntimeInfo, ApiError> {
        runtimes::check_name("runtime", &req.name)?;
        let first = self.resolve_spec(&req.name, 1, req.spec())?;
        runtimes::create(&self.inner.store, &req.name, &first)
    }

    fn list_runtimes(&self) -> Result<Vec<RuntimeInfo>, ApiError> {
        runtimes::list(&self.inner.store)
    }

    fn get_runtime(&self, name: &str) -> Result<RuntimeInfo, ApiError> {
        runtimes::get(&self.inner.store, name)
    }

    fn add_runtime_version(&self, name: &str, spec: RuntimeSpec) -> Result<RuntimeVersion, ApiError> {
        // Validate before taking a number, so a bad spec consumes none.
        let checked = self.resolve_spec(name, 0, spec)?;
        runtimes::add_version(&self.inner.store, name, |n| RuntimeVersion { version: n, ..checked })
    }

    fn runtime_versions(&self, name: &str) -> Result<Vec<RuntimeVersion>, ApiError> {
        runtimes::versions(&self.inner.store, name)
    }

    fn pin_endpoint(&self, name: &str, endpoint: &str, version: u32) -> Result<RuntimeInfo, ApiError> {
        runtimes::pin(&self.inner.store, name, endpoint, version)
    }

    async fn delete_runtime(&self, name: String, force: bool) -> Result<RuntimeInfo, ApiError> {
        runtimes::get(&self.inner.store, &name)?;
        let running: Vec<String> = self
            .sessions_snapshot()
            .iter()
            .map(|s| s.snapshot())
            .filter(|i| i.runtime.as_deref() == Some(name.as_str()) && i.state == SessionState::Running)
            .map(|i| i.id)
            .collect();
        if !running.is_empty() && !force {
            return Err(ApiError::conflict(format!(
                "runtime {name} has {} running session(s) ({}); DELETE with ?force=true ends them",
                running.len(),
                running.join(", ")
            )));
        }
        for id in running {
            self.end_session(&id, "runtime_deleted").await?;
        }
        runtimes::delete(&self.inner.store, &name)
    }

    async fn create_code_session(&self, req: CreateCodeSession) -> Result<serde_json::Value, ApiError> {
        let info = self
            .create(CreateSession {
                image: req.image,
                max_lifetime_s: req.timeout_s,
                ..Default::default()
            })
            .await?;
        let s = self.running(&info.id)?;
        s.code_interpreter.store(true, Ordering::Release);
        code::prepare(&s).await;
        Ok(serde_json::json!({
            "session_id": info.id,
            "workspace": code::WORKSPACE,
            "session": s.snapshot(),
        }))
    }

    async fn invoke_tool(&self, id: String, call: ToolCall) -> Result<serde_json::Value, ApiError> {
        let s = self.code_session(&id)?;
        let port = self.interpreter_port(&s);
        code::invoke(&s, call, port).await
    }

    async fn invoke_tool_stream(
        &self,
        id: String,
        call: ToolCall,
    ) -> Result<tokio::sync::mpsc::Receiver<serde_json::Value>, ApiError> {
        let s = self.code_session(&id)?;
        match call.name.as_str() {
            "executeCommand" | "executeCode" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "{other} has no streaming variant: only executeCommand and executeCode stream"
                )))
            }
        }
        if let (Some(port), Some((language, code, timeout))) = (self.interpreter_port(&s), code::interpreted(&call)?) {
            return interpreter::execute(&s, port, language, &code, timeout).await;
        }
        let (argv, timeout) = code::command_of(&call)?;
        code::run_streaming(&s, argv, timeout).await
    }

    async fn delete_code_session(&self, id: String) -> Result<SessionInfo, ApiError> {
        self.code_session(&id)?;
        self.end_session(&id, "deleted").await
    }

    async fn invoke(&self, runtime: String, inv: Invocation) -> Result<InvocationResponse, ApiError> {
        let endpoint = inv
            .endpoint
            .clone()
            .unwrap_or_else(|| runtimes::DEFAULT_ENDPOINT.into());
        runtimes::check_name("endpoint", &endpoint)?;
        let version = runtimes::resolve(&self.inner.store, &runtime, &endpoint)?;
        let client_sid = inv.session_id.clone().unwrap_or_else(|| {
            let h = random_hex(16);
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
        });
        let key = (runtime.clone(), client_sid.clone());
        let bound = self
            .inner
            .affinity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let session = match bound
            .and_then(|id| self.live(&id))
            .filter(|s| s.snapshot().state == SessionState::Running)
        {
            Some(s) => s,
            None => {
                let info = self
                    .create_resolved(Self::session_request_of(&version), Some(version))
                    .await?;
                let winner = {
                    let mut map = self.inner.affinity.lock().unwrap_or_else(|p| p.into_inner());
                    match map.get(&key).and_then(|id| self.live(id)) {
                        // Another first invocation with this id won the race.
                        Some(other) if other.snapshot().state == SessionState::Running => Some(other),
                        _ => {
                            map.insert(key.clone(), info.id.clone());
                            None
                        }
                    }
                };
                match winner {
                    Some(other) => {
                        let _ = self.end_session(&info.id, "deleted").await;
                        other
                    }
                    None => self.running(&info.id)?,
                }
            }
        };
        let version = session
            .runtime
            .clone()
            .ok_or_else(|| ApiError::internal("an invocation session without its runtime"))?;
        session
            .agent_ready
            .get_or_try_init(|| invoke::start_agent(&session, &version))
            .await?;
        invoke::forward(session, client_sid, inv).await
    }

    fn list_images(&self) -> Result<Vec<ImageInfo>, ApiError> {
        Ok(self.images_list())
    }

    async fn import_image(&self, req: ImportImage) -> Result<ImageInfo, ApiError> {
        self.image_import(req).await
    }

    async fn delete_image(&self, name: String) -> Result<ImageInfo, ApiError> {
        self.image_delete(&name).await
    }

    fn health(&self) -> Health {
        let sessions = self.sessions_snapshot();
        Health {
            status: if self.inner.draining.load(Ordering::Acquire) {
                "draining".into()
            } else {
                "ok".into()
            },
            backend: self.backend().as_str().into(),
            isolation: self.backend().isolation().into(),
            sessions_running: sessions.len() as u64,
            pool_ready: self.inner.pools.iter().map(|p| u64::from(p.ready())).sum(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn pools(&self) -> Vec<PoolInfo> {
        self.inner
            .pools
            .iter()
            .map(|p| PoolInfo {
                image: p.key.image.clone(),
                vcpus: p.key.vcpus,
                memory_mib: p.key.memory_mib,
                backend: self.backend().as_str().into(),
                target: p.target,
                ready: p.ready(),
                booting: p.booting(),
                boot_failures: p.failures(),
                last_error: p.last_error(),
            })
            .collect()
    }

    fn metrics(&self) -> String {
        let m = &self.inner.metrics;
        for p in &self.inner.pools {
            let l = PoolLabels {
                image: p.key.image.clone(),
                vcpus: p.key.vcpus,
                memory_mib: p.key.memory_mib,
                backend: self.backend().as_str().into(),
            };
            m.pool_ready.get_or_create(&l).set(i64::from(p.ready()));
            m.pool_booting.get_or_create(&l).set(i64::from(p.booting()));
            m.pool_target.get_or_create(&l).set(i64::from(p.target));
        }
        let mut by_state: HashMap<&'static str, i64> = HashMap::from([("running", 0), ("ending", 0)]);
        for s in self.sessions_snapshot() {
            *by_state.entry(s.snapshot().state.as_str()).or_default() += 1;
        }
        for (state, n) in by_state {
            m.sessions.get_or_create(&StateLabel { state: state.into() }).set(n);
        }
        m.render()
    }
}
