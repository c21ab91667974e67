//! Runtimes: named agent definitions with immutable, numbered versions and
//! named endpoints that point at one version each (`DEFAULT` always
//! follows the latest), kept in the state database.

use std::collections::BTreeMap;

use control_api::api::{RuntimeInfo, RuntimeVersion};
use control_api::ApiError;
use rusqlite::{params, OptionalExtension};

use crate::session::now_ms;
use crate::store::Store;

/// The endpoint that always serves the latest version.
pub const DEFAULT_ENDPOINT: &str = "DEFAULT";

fn db(e: crate::store::StoreError) -> ApiError {
    ApiError::internal(e.to_string())
}

/// Runtime and endpoint names: a letter, then up to 47 letters, digits,
/// '-' or '_'.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || name.len() > 48 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ApiError::bad_request(format!(
            "{what} name {:?} is malformed: a letter, then up to 47 letters, digits, '-' or '_'",
            name.chars().take(60).collect::<String>()
        )));
    }
    Ok(())
}

/// Checks an agent environment.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "env key {k:?}: names are non-empty, without '=' or NUL, and values without NUL"
            )));
        }
    }
    Ok(())
}

/// Creates `name` with `first` as version 1.
pub fn create(store: &Store, name: &str, first: &RuntimeVersion) -> Result<RuntimeInfo, ApiError> {
    let record = serde_json::to_string(first).map_err(|e| ApiError::internal(e.to_string()))?;
    let created = store
        .with(|c| {
            let tx = c.unchecked_transaction()?;
            let n = tx.execute(
                "INSERT OR IGNORE INTO runtimes (name, created_at_ms) VALUES (?1, ?2)",
                params![name, first.created_at_ms as i64],
            )?;
            if n == 1 {
                tx.execute(
                    "INSERT INTO runtime_versions (name, version, record) VALUES (?1, 1, ?2)",
                    params![name, record],
                )?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
        .map_err(db)?;
    if !created {
        return Err(ApiError::conflict(format!("runtime {name} already exists")));
    }
    get(store, name)
}

/// One runtime with its endpoints.
pub fn get(store: &Store, name: &str) -> Result<RuntimeInfo, ApiError> {
    let row: Option<(i64, Option<i64>)> = store
        .with(|c| {
            c.query_row(
                "SELECT created_at_ms, (SELECT MAX(version) FROM runtime_versions v WHERE v.name = r.name)
                 FROM runtimes r WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .map_err(db)?;
    let Some((created, latest)) = row else {
        return Err(ApiError::not_found(format!("no runtime {name}")));
    };
    let latest = latest.unwrap_or(0) as u32;
    let mut endpoints: BTreeMap<String, u32> = store
        .with(|c| {
            let mut st = c.prepare("SELECT endpoint, version FROM runtime_endpoints WHERE name = ?1")?;
            let rows = st.query_map([name], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u32)))?;
            rows.collect()
        })
        .map_err(db)?;
    endpoints.insert(DEFAULT_ENDPOINT.into(), latest);
    Ok(RuntimeInfo {
        name: name.into(),
        created_at_ms: created as u64,
        latest_version: latest,
        endpoints,
    })
}

/// Every runtime, by name.
pub fn list(store: &Store) -> Result<Vec<RuntimeInfo>, ApiError> {
    let names: Vec<String> = store
        .with(|c| {
            let mut st = c.prepare("SELECT name FROM runtimes ORDER BY name")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .map_err(db)?;
    names.iter().map(|n| get(store, n)).collect()
}

/// Adds the next version; `make(n)` builds it once its number is known.
pub fn add_version(
    store: &Store,
    name: &str,
    make: impl FnOnce(u32) -> RuntimeVersion,
) -> Result<RuntimeVersion, ApiError> {
    let info = get(store, name)?;
    let v = make(info.latest_version + 1);
    let record = serde_json::to_string(&v).map_err(|e| ApiError::internal(e.to_string()))?;
    // The primary key makes a concurrent add of the same number fail
    // rather than overwrite: versions are immutable.
    store
        .with(|c| {
            c.execute(
                "INSERT INTO runtime_versions (name, version, record) VALUES (?1, ?2, ?3)",
                params![name, v.version, record],
            )
        })
        .map_err(|e| ApiError::conflict(format!("version {} of {name} was added concurrently: {e}", v.version)))?;
    Ok(v)
}

/// Every version, oldest first.
pub fn versions(store: &Store, name: &str) -> Result<Vec<RuntimeVersion>, ApiError> {
    get(store, name)?;
    let records: Vec<String> = store
        .with(|c| {
            let mut st = c.prepare("SELECT record FROM runtime_versions WHERE name = ?1 ORDER BY version")?;
            let rows = st.query_map([name], |r| r.get(0))?;
            rows.collect()
        })
        .map_err(db)?;
    records.iter().map(|r| decode_version(name, r)).collect()
}

fn decode_version(name: &str, record: &str) -> Result<RuntimeVersion, ApiError> {
    serde_json::from_str(record).map_err(|e| ApiError::internal(format!("stored version of {name}: {e}")))
}

/// The version `endpoint` serves.
pub fn resolve(store: &Store, name: &str, endpoint: &str) -> Result<RuntimeVersion, ApiError> {
    let info = get(store, name)?;
    let Some(&version) = info.endpoints.get(endpoint) else {
        return Err(ApiError::not_found(format!(
            "runtime {name} has no endpoint {endpoint}"
        )));
    };
    let record: Option<String> = store
        .with(|c| {
            c.query_row(
                "SELECT record FROM runtime_versions WHERE name = ?1 AND version = ?2",
                params![name, version],
                |r| r.get(0),
            )
            .optional()
        })
        .map_err(db)?;
    let record = record.ok_or_else(|| {
        ApiError::internal(format!(
            "endpoint {endpoint} of {name} points at missing version {version}"
        ))
    })?;
    decode_version(name, &record)
}

/// Points `endpoint` at `version` (roll forward or back).
pub fn pin(store: &Store, name: &str, endpoint: &str, version: u32) -> Result<RuntimeInfo, ApiError> {
    check_name("endpoint", endpoint)?;
    if endpoint == DEFAULT_ENDPOINT {
        return Err(ApiError::conflict(
            "the DEFAULT endpoint always serves the latest version; pin a named endpoint instead",
        ));
    }
    let info = get(store, name)?;
    if version == 0 || version > info.latest_version {
        return Err(ApiError::not_found(format!(
            "runtime {name} has no version {version} (versions 1..={})",
            info.latest_version
        )));
    }
    store
        .with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO runtime_endpoints (name, endpoint, version) VALUES (?1, ?2, ?3)",
                params![name, endpoint, version],
            )
        })
        .map_err(db)?;
    get(store, name)
}

/// Removes a runtime, its versions and endpoints.
pub fn delete(store: &Store, name: &str) -> Result<RuntimeInfo, ApiError> {
    let info = get(store, name)?;
    store
        .with(|c| c.execute("DELETE FROM runtimes WHERE name = ?1", [name]))
        .map_err(db)?;
    Ok(info)
}

/// A fresh version record.
pub fn version_record(
    runtime: &str,
    version: u32,
    key: &crate::backend::PoolKey,
    env: BTreeMap<String, String>,
    idle_timeout_s: u64,
    max_lifetime_s: u64,
    command: Option<Vec<String>>,
) -> RuntimeVersion {
    RuntimeVersion {
        runtime: runtime.into(),
        version,
        image: key.image.clone(),
        vcpus: key.vcpus,
        memory_mib: key.memory_mib,
        env,
        idle_timeout_s,
        max_lifetime_s,
        command,
        created_at_ms: now_ms(),
    }
}
