//! The image store: OCI images imported into `<image_store.dir>/<name>/`
//! (`rootfs.ext4` and `image.json`, see `warren_images::oci`). At start
//! agentd registers every stored image beside the configured ones; an
//! import registers it at once. Imported images boot with the kernel and
//! initramfs (guest-agent) of `image_store.boot_image`, their root being
//! the ext4 file, and run their own entrypoint (the agent server on port
//! 8080), so a runtime can name them directly.

use std::path::{Path, PathBuf};

use control_api::api::ImageInfo;
use control_api::ApiError;
use warren_images::oci::{self, ImportLimits, OciError};

use crate::config::{Config, ImageConfig};

/// One stored image.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// Its name.
    pub name: String,
    /// The ext4 root file system.
    pub rootfs: PathBuf,
    /// Its size.
    pub rootfs_bytes: u64,
    /// `image.json`, as stored.
    pub metadata: serde_json::Value,
}

/// The store's directory and limits.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    limits: ImportLimits,
    boot: Option<ImageConfig>,
    boot_name: String,
}

impl ImageStore {
    /// The store `cfg` describes.
    pub fn new(cfg: &Config) -> ImageStore {
        ImageStore {
            dir: cfg.image_store_dir(),
            limits: ImportLimits {
                max_image_bytes: cfg.image_store.max_image_mib << 20,
                max_layers: cfg.image_store.max_layers,
                ..ImportLimits::default()
            },
            boot: cfg.images.get(&cfg.image_store.boot_image).cloned(),
            boot_name: cfg.image_store.boot_image.clone(),
        }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes what imports of processes that no longer run left behind
    /// (`.staging-*`, `.tmp-*`); called at start.
    pub fn remove_leftovers(&self) {
        match oci::remove_leftovers(&self.dir) {
            Ok(gone) => {
                for d in gone {
                    tracing::info!(dir = %d.display(), "removed what an interrupted import left");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot clean the image store"),
        }
    }

    /// Every complete image in the store (imports in progress, in
    /// dot-directories, are not images yet).
    pub fn load(&self) -> Vec<StoredImage> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match self.read(&name) {
                Ok(img) => out.push(img),
                Err(why) => tracing::warn!(image = %name, %why, "skipping a damaged stored image"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn read(&self, name: &str) -> Result<StoredImage, String> {
        oci::validate_name(name).map_err(|e| e.to_string())?;
        let dir = self.dir.join(name);
        let meta_path = dir.join(oci::METADATA_FILE);
        let rootfs = dir.join(oci::ROOTFS_FILE);
        let text = std::fs::read(&meta_path).map_err(|e| format!("{}: {e}", meta_path.display()))?;
        let metadata: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", meta_path.display()))?;
        let rootfs_bytes = std::fs::metadata(&rootfs)
            .map_err(|e| format!("{}: {e}", rootfs.display()))?
            .len();
        Ok(StoredImage {
            name: name.to_string(),
            rootfs,
            rootfs_bytes,
            metadata,
        })
    }

    /// Imports `src` as `name` (blocking: unpacking and making the file
    /// system take a while).
    pub fn import(&self, src: &Path, name: &str) -> Result<StoredImage, ApiError> {
        if !src.is_absolute() {
            return Err(ApiError::bad_request(format!(
                "path {} must be absolute (it is read by agentd, on its host)",
                src.display()
            )));
        }
        if !src.exists() {
            return Err(ApiError::bad_request(format!("path {} does not exist", src.display())));
        }
        let imported = oci::import(src, &self.dir, name, &self.limits).map_err(import_error)?;
        self.read(&imported.name).map_err(ApiError::internal)
    }

    /// Removes `name` from the store.
    pub fn remove(&self, name: &str) -> Result<(), ApiError> {
        oci::validate_name(name).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let dir = self.dir.join(name);
        std::fs::remove_dir_all(&dir).map_err(|e| ApiError::internal(format!("removing {}: {e}", dir.display())))
    }

    /// The image whose kernel and initramfs imported images boot with.
    pub fn boot_image(&self) -> Result<&ImageConfig, String> {
        self.boot.as_ref().ok_or_else(|| {
            format!(
                "image_store.boot_image {:?} is not a configured image: imported images need its kernel and initramfs",
                self.boot_name
            )
        })
    }

    /// How agentd boots a stored image.
    pub fn image_config(&self, img: &StoredImage) -> Result<ImageConfig, String> {
        let boot = self.boot_image()?.clone();
        Ok(ImageConfig {
            kernel: boot.kernel,
            initramfs: boot.initramfs,
            cmdline: boot.cmdline,
            rootfs: Some(img.rootfs.clone()),
            interpreter_port: interpreter_port(&img.metadata),
            agent_command: None,
        })
    }
}

/// The `warren.interpreter.port` label, when the image has one.
pub fn interpreter_port(metadata: &serde_json::Value) -> Option<u16> {
    metadata["labels"]["warren.interpreter.port"]
        .as_str()
        .and_then(|p| p.parse().ok())
}

/// The API's view of a stored image.
pub fn info(img: &StoredImage) -> ImageInfo {
    ImageInfo {
        name: img.name.clone(),
        origin: "imported".into(),
        rootfs: Some(img.rootfs.display().to_string()),
        rootfs_bytes: Some(img.rootfs_bytes),
        interpreter_port: interpreter_port(&img.metadata),
        metadata: Some(img.metadata.clone()),
    }
}

fn import_error(e: OciError) -> ApiError {
    match e {
        OciError::AlreadyExists { .. } => ApiError::conflict(e.to_string()),
        OciError::Io { .. } => ApiError::internal(e.to_string()),
        OciError::Ext4(ref x) if !matches!(x, warren_images::ext4::Ext4Error::TooLarge { .. }) => {
            ApiError::internal(e.to_string())
        }
        other => ApiError::new(400, "bad_image", format!("image import refused: {other}")),
    }
}
