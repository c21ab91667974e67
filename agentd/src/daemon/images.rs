//! `GET/POST /v1/images` and `DELETE /v1/images/{name}`: the configured
//! images and the ones imported into the image store.

use std::path::Path;

use control_api::api::{ImageInfo, ImportImage};
use control_api::ApiError;

use super::Daemon;
use crate::backend::Backends;
use crate::image_store::{self, ImageStore};

/// Registers every stored image with the backends (at start). A stored
/// image named like a configured one is skipped: configuration wins.
pub(super) fn register_stored(store: &ImageStore, backends: &Backends) {
    if store.dir().exists() {
        store.remove_leftovers();
    }
    for img in store.load() {
        match store.image_config(&img) {
            Ok(cfg) => {
                if !backends.add_image(&img.name, cfg, false) {
                    tracing::warn!(image = %img.name, "a configured image has this name; the stored one is not used");
                }
            }
            Err(why) => tracing::warn!(image = %img.name, %why, "cannot use a stored image"),
        }
    }
}

impl Daemon {
    pub(super) fn images_list(&self) -> Vec<ImageInfo> {
        let stored: std::collections::HashMap<String, image_store::StoredImage> = self
            .inner
            .image_store
            .load()
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect();
        self.inner
            .backends
            .images()
            .into_iter()
            .map(|(name, cfg)| match stored.get(&name) {
                Some(img) if !self.inner.cfg.images.contains_key(&name) => image_store::info(img),
                _ => ImageInfo {
                    rootfs_bytes: cfg
                        .rootfs
                        .as_ref()
                        .and_then(|r| std::fs::metadata(r).ok())
                        .map(|m| m.len()),
                    rootfs: cfg.rootfs.as_ref().map(|r| r.display().to_string()),
                    interpreter_port: cfg.interpreter_port,
                    metadata: None,
                    origin: "config".into(),
                    name,
                },
            })
            .collect()
    }

    pub(super) async fn image_import(&self, req: ImportImage) -> Result<ImageInfo, ApiError> {
        if self.inner.backends.has_image(&req.name) {
            return Err(ApiError::conflict(format!(
                "an image named {:?} exists already",
                req.name
            )));
        }
        // Refused before any work: imported images boot with the boot
        // image's kernel and initramfs.
        self.inner.image_store.boot_image().map_err(ApiError::internal)?;
        {
            let mut busy = self.inner.importing.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert(req.name.clone()) {
                return Err(ApiError::conflict(format!(
                    "image {:?} is being imported already",
                    req.name
                )));
            }
        }
        // The import finishes, and registers its image, even when the
        // client goes away meanwhile (dropping this future).
        let d = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = d.inner.image_store.import(Path::new(&req.path), &req.name).and_then(|img| {
                let cfg = d.inner.image_store.image_config(&img).map_err(ApiError::internal)?;
                if !d.inner.backends.add_image(&img.name, cfg, false) {
                    return Err(ApiError::conflict(format!("an image named {:?} exists already", img.name)));
                }
                tracing::info!(image = %img.name, bytes = img.rootfs_bytes, ms = started.elapsed().as_millis() as u64, "image imported");
                Ok(image_store::info(&img))
            });
            d.inner
                .importing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req.name);
            result
        });
        task.await
            .map_err(|e| ApiError::internal(format!("the import task failed: {e}")))?
    }

    pub(super) async fn image_delete(&self, name: &str) -> Result<ImageInfo, ApiError> {
        if self.inner.cfg.images.contains_key(name) {
            return Err(ApiError::conflict(format!(
                "image {name:?} comes from agentd's configuration; only imported images can be deleted"
            )));
        }
        let img = self
            .inner
            .image_store
            .load()
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| ApiError::not_found(format!("no imported image {name:?}")))?;
        let in_use = self
            .sessions_snapshot()
            .iter()
            .filter(|s| s.snapshot().image == name)
            .count();
        if in_use > 0 || self.inner.pools.iter().any(|p| p.key.image == name) {
            return Err(ApiError::conflict(format!(
                "image {name:?} is in use ({in_use} running sessions, or a configured pool)"
            )));
        }
        // A runtime version naming the image would be left pointing at nothing.
        for r in crate::runtimes::list(&self.inner.store)? {
            if let Some(v) = crate::runtimes::versions(&self.inner.store, &r.name)?
                .iter()
                .find(|v| v.image == name)
            {
                return Err(ApiError::conflict(format!(
                    "image {name:?} is used by runtime {:?} version {}: delete the runtime first",
                    r.name, v.version
                )));
            }
        }
        self.inner.backends.remove_image(name);
        if let Some(ns) = self.inner.backends.namespace() {
            ns.release_image(&img.rootfs);
        }
        self.inner.image_store.remove(name)?;
        Ok(image_store::info(&img))
    }
}
