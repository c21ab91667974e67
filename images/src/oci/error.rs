//! [`OciError`]: why an image could not be imported.

use std::path::PathBuf;

use crate::ext4::Ext4Error;

/// Why an image could not be imported. Every message names the file, blob
/// or layer entry concerned.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image name is not `[a-z0-9][a-z0-9._-]{0,62}`.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The store already holds an image of that name.
    #[error("an image named {name:?} already exists in {}", store.display())]
    AlreadyExists {
        /// The name.
        name: String,
        /// The store.
        store: PathBuf,
    },
    /// The source is neither an OCI image layout nor a `docker save` archive.
    #[error("{}: {reason}", path.display())]
    UnknownFormat {
        /// The source.
        path: PathBuf,
        /// What was looked for.
        reason: String,
    },
    /// A file of the source (index, manifest, config, `manifest.json`) is
    /// missing, malformed or not what was expected.
    #[error("{what}: {reason}")]
    Malformed {
        /// The file or blob.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A blob's content does not hash to the digest that referenced it.
    #[error("blob {blob}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The blob (its digest or path in the source).
        blob: String,
        /// The digest it was referenced by.
        expected: String,
        /// The digest of its content.
        actual: String,
    },
    /// A blob's length differs from the size that referenced it.
    #[error("blob {blob}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        blob: String,
        /// The size it was referenced with.
        expected: u64,
        /// Its length (or at least the length read, when too long).
        actual: u64,
    },
    /// The index has no manifest this importer can choose.
    #[error("{what}: no manifest for linux/amd64 and not exactly one manifest (found: {found})")]
    NoMatchingManifest {
        /// The index.
        what: String,
        /// The platforms (or references) on offer.
        found: String,
    },
    /// A layer is compressed with something other than gzip.
    #[error("layer {blob}: unsupported layer compression {compression} (only uncompressed and gzip tar layers are supported)")]
    UnsupportedCompression {
        /// The layer.
        blob: String,
        /// What its magic bytes say it is.
        compression: &'static str,
    },
    /// A layer's tar or gzip stream is damaged or truncated.
    #[error("layer {blob}: corrupt or truncated{}: {source}", entry_suffix(.entry))]
    CorruptLayer {
        /// The layer.
        blob: String,
        /// The entry being read, when there was one.
        entry: Option<String>,
        /// The decoder's or reader's error.
        source: std::io::Error,
    },
    /// An entry that would escape the root or write through a symlink.
    #[error("layer {blob}: unsafe entry {entry:?}: {reason}")]
    UnsafeEntry {
        /// The layer.
        blob: String,
        /// The entry's path in the tar.
        entry: String,
        /// What it would have done.
        reason: String,
    },
    /// An entry this importer cannot represent (sparse file, unknown type,
    /// bad header field).
    #[error("layer {blob}: entry {entry:?}: {reason}")]
    UnsupportedEntry {
        /// The layer.
        blob: String,
        /// The entry's path in the tar.
        entry: String,
        /// What it is.
        reason: String,
    },
    /// Extracting an entry into the staging tree failed.
    #[error("layer {blob}: entry {entry:?}: {source}")]
    Extract {
        /// The layer.
        blob: String,
        /// The entry's path in the tar.
        entry: String,
        /// Why.
        source: std::io::Error,
    },
    /// The content is larger than [`ImportLimits::max_image_bytes`](super::ImportLimits).
    #[error("the image is over the limit of {limit} bytes ({at})")]
    TooLarge {
        /// The limit.
        limit: u64,
        /// Where it was crossed.
        at: String,
    },
    /// More layers than [`ImportLimits::max_layers`](super::ImportLimits).
    #[error("the image has {count} layers, over the limit of {limit}")]
    TooManyLayers {
        /// Layers in the manifest.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// More tar entries than [`ImportLimits::max_entries`](super::ImportLimits).
    #[error("the image has more than {limit} layer entries (at layer {blob})")]
    TooManyEntries {
        /// The limit.
        limit: usize,
        /// The layer where it was crossed.
        blob: String,
    },
    /// `Config.User` names a user or group the image does not have.
    #[error("user {user:?}: {reason}")]
    User {
        /// `Config.User`.
        user: String,
        /// Why it cannot be resolved.
        reason: String,
    },
    /// An I/O error on the source or the store.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The ext4 image could not be built.
    #[error("building the root file system: {0}")]
    Ext4(#[from] Ext4Error),
}

fn entry_suffix(entry: &Option<String>) -> String {
    match entry {
        Some(e) => format!(" at entry {e:?}"),
        None => String::new(),
    }
}

impl OciError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        OciError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(what: impl Into<String>, reason: impl Into<String>) -> Self {
        OciError::Malformed {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
