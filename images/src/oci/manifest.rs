//! The image's documents: OCI `index.json` / index / manifest / config,
//! docker `manifest.json`; and the plan they resolve to (config + layers).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::OciError;
use super::source::{Sha256Digest, Source};

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Nested indexes followed at most.
const MAX_INDEX_DEPTH: usize = 4;

#[derive(Debug, Deserialize)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The parts of an image config this importer uses.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) config: Option<RunConfig>,
    pub(crate) rootfs: Option<RootFs>,
}

/// `config` of an image config: how to run it.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RunConfig {
    #[serde(rename = "User", default)]
    pub(crate) user: Option<String>,
    #[serde(rename = "Env", default)]
    pub(crate) env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub(crate) entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub(crate) cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub(crate) working_dir: Option<String>,
    #[serde(rename = "ExposedPorts", default)]
    pub(crate) exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// One layer to apply.
#[derive(Debug, Clone)]
pub(crate) struct LayerRef {
    /// Its file in the source.
    pub(crate) path: String,
    /// How messages name it (its digest, or its path when it has none).
    pub(crate) label: String,
    /// The digest of the blob as stored (compressed or not), when known.
    pub(crate) digest: Option<Sha256Digest>,
    /// Its size as stored, when known.
    pub(crate) size: Option<u64>,
    /// The digest of the uncompressed tar (`rootfs.diff_ids`).
    pub(crate) diff_id: Sha256Digest,
}

/// What the documents resolve to.
#[derive(Debug)]
pub(crate) struct Plan {
    /// `"oci-layout"` or `"docker-archive"`.
    pub(crate) kind: &'static str,
    /// The manifest's digest (OCI) or the image ID (docker-archive: the
    /// config's digest).
    pub(crate) manifest_digest: String,
    pub(crate) config_digest: String,
    pub(crate) config: ImageConfig,
    pub(crate) layers: Vec<LayerRef>,
}

fn parse<'a, T: Deserialize<'a>>(data: &'a [u8], what: &str) -> Result<T, OciError> {
    serde_json::from_slice(data).map_err(|e| OciError::malformed(what, format!("invalid JSON: {e}")))
}

/// Reads the plan of the image in `src`: `manifest.json` → docker-archive,
/// else `oci-layout` + `index.json` → OCI image layout.
pub(crate) fn plan(src: &Source, path: &std::path::Path) -> Result<Plan, OciError> {
    let plan = if src.exists("manifest.json") {
        docker_plan(src)?
    } else if src.exists("oci-layout") {
        oci_plan(src)?
    } else {
        return Err(OciError::UnknownFormat {
            path: path.to_path_buf(),
            reason: "neither an OCI image layout (no oci-layout) nor a docker save archive (no manifest.json)".into(),
        });
    };
    if !plan.config.os.is_empty() && plan.config.os != "linux" {
        return Err(OciError::malformed(
            format!("config {}", plan.config_digest),
            format!("the image is for {:?}, not linux", plan.config.os),
        ));
    }
    Ok(plan)
}

fn oci_plan(src: &Source) -> Result<Plan, OciError> {
    let layout_what = src.describe("oci-layout");
    let layout: serde_json::Value = parse(&src.read_small("oci-layout")?, &layout_what)?;
    if layout.get("imageLayoutVersion").and_then(|v| v.as_str()).is_none() {
        return Err(OciError::malformed(layout_what, "no imageLayoutVersion"));
    }
    let index_what = src.describe("index.json");
    let mut index: Index = parse(&src.read_small("index.json")?, &index_what)?;
    let mut what = index_what;
    for _ in 0..=MAX_INDEX_DEPTH {
        let chosen = choose(&index.manifests, &what)?;
        let digest = Sha256Digest::parse(&chosen.digest, &what)?;
        let data = src.read_blob(&digest.blob_path(), &digest.0, &digest, Some(chosen.size))?;
        let kind = document_kind(&chosen.media_type, &data, &digest.0)?;
        if kind == Kind::Index {
            index = parse(&data, &format!("index {}", digest.0))?;
            what = format!("index {}", digest.0);
            continue;
        }
        return manifest_plan(src, &digest, &data);
    }
    Err(OciError::malformed(
        what,
        format!("indexes nested deeper than {MAX_INDEX_DEPTH}"),
    ))
}

#[derive(PartialEq, Eq)]
enum Kind {
    Index,
    Manifest,
}

/// Index or manifest, from the referencing media type, else the document's
/// own `mediaType` or shape.
fn document_kind(media_type: &str, data: &[u8], what: &str) -> Result<Kind, OciError> {
    let own = || -> Result<(String, bool), OciError> {
        let v: serde_json::Value = parse(data, what)?;
        let mt = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or("").to_string();
        Ok((mt, v.get("manifests").is_some()))
    };
    let mt = if media_type.is_empty() {
        let (mt, has_manifests) = own()?;
        if mt.is_empty() {
            return Ok(if has_manifests { Kind::Index } else { Kind::Manifest });
        }
        mt
    } else {
        media_type.to_string()
    };
    match mt.as_str() {
        MT_OCI_INDEX | MT_DOCKER_LIST => Ok(Kind::Index),
        MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => Ok(Kind::Manifest),
        other => Err(OciError::malformed(
            what,
            format!("unsupported media type {other:?} (not an image index or manifest)"),
        )),
    }
}

fn is_attestation(d: &Descriptor) -> bool {
    d.annotations
        .get("vnd.docker.reference.type")
        .is_some_and(|t| t == "attestation-manifest")
        || d.platform
            .as_ref()
            .is_some_and(|p| p.os == "unknown" && p.architecture == "unknown")
}

/// linux/amd64, else the only candidate.
fn choose<'a>(descs: &'a [Descriptor], what: &str) -> Result<&'a Descriptor, OciError> {
    let candidates: Vec<&Descriptor> = descs.iter().filter(|d| !is_attestation(d)).collect();
    let amd64 = candidates.iter().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == "linux"
                && p.architecture == "amd64"
                && p.variant.as_deref().is_none_or(|v| v == "v1" || v.is_empty())
        })
    });
    if let Some(d) = amd64 {
        return Ok(d);
    }
    if let [only] = candidates.as_slice() {
        return Ok(only);
    }
    let found: Vec<String> = candidates
        .iter()
        .map(
            |d| match (&d.platform, d.annotations.get("org.opencontainers.image.ref.name")) {
                (Some(p), _) => format!(
                    "{}/{}{}",
                    p.os,
                    p.architecture,
                    p.variant.as_ref().map(|v| format!("/{v}")).unwrap_or_default()
                ),
                (None, Some(r)) => format!("ref {r}"),
                (None, None) => d.digest.clone(),
            },
        )
        .collect();
    Err(OciError::NoMatchingManifest {
        what: what.to_string(),
        found: if found.is_empty() {
            "none".into()
        } else {
            found.join(", ")
        },
    })
}

fn manifest_plan(src: &Source, manifest_digest: &Sha256Digest, data: &[u8]) -> Result<Plan, OciError> {
    let what = format!("manifest {}", manifest_digest.0);
    let manifest: Manifest = parse(data, &what)?;
    let cfg = &manifest.config;
    if !cfg.media_type.is_empty() && cfg.media_type != MT_OCI_CONFIG && cfg.media_type != MT_DOCKER_CONFIG {
        return Err(OciError::malformed(
            &what,
            format!(
                "config media type {:?} is not an image config (an artifact, not a container image?)",
                cfg.media_type
            ),
        ));
    }
    let config_digest = Sha256Digest::parse(&cfg.digest, &what)?;
    let config_data = src.read_blob(
        &config_digest.blob_path(),
        &config_digest.0,
        &config_digest,
        Some(cfg.size),
    )?;
    let config_what = format!("config {}", config_digest.0);
    let config: ImageConfig = parse(&config_data, &config_what)?;
    let diff_ids = diff_ids(&config, manifest.layers.len(), &config_what)?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (desc, diff_id) in manifest.layers.iter().zip(diff_ids) {
        let digest = Sha256Digest::parse(&desc.digest, &what)?;
        layers.push(LayerRef {
            path: digest.blob_path(),
            label: digest.0.clone(),
            digest: Some(digest),
            size: Some(desc.size),
            diff_id,
        });
    }
    Ok(Plan {
        kind: "oci-layout",
        manifest_digest: manifest_digest.0.clone(),
        config_digest: config_digest.0,
        config,
        layers,
    })
}

/// The config's `rootfs.diff_ids`, which must match the layer count.
fn diff_ids(config: &ImageConfig, layers: usize, what: &str) -> Result<Vec<Sha256Digest>, OciError> {
    let ids = config.rootfs.as_ref().map(|r| r.diff_ids.as_slice()).unwrap_or(&[]);
    if ids.len() != layers {
        return Err(OciError::malformed(
            what,
            format!("rootfs.diff_ids lists {} layers, the manifest {layers}", ids.len()),
        ));
    }
    ids.iter().map(|d| Sha256Digest::parse(d, what)).collect()
}

/// The digest a docker archive's path implies: `blobs/sha256/<hex>` or
/// `<hex>.json` / `<hex>`.
fn digest_from_path(path: &str) -> Option<Sha256Digest> {
    let name = path.strip_prefix("blobs/sha256/").or_else(|| {
        let n = path.strip_suffix(".json").unwrap_or(path);
        (!n.contains('/')).then_some(n)
    })?;
    Sha256Digest::parse(&format!("sha256:{name}"), "").ok()
}

fn docker_plan(src: &Source) -> Result<Plan, OciError> {
    let what = src.describe("manifest.json");
    let entries: Vec<DockerEntry> = parse(&src.read_small("manifest.json")?, &what)?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => return Err(OciError::malformed(&what, "lists no image")),
        many => {
            let tags: Vec<String> = many
                .iter()
                .map(|e| {
                    e.repo_tags
                        .as_ref()
                        .and_then(|t| t.first().cloned())
                        .unwrap_or_else(|| e.config.clone())
                })
                .collect();
            return Err(OciError::malformed(
                &what,
                format!(
                    "lists {} images ({}); save one image per archive",
                    many.len(),
                    tags.join(", ")
                ),
            ));
        }
    };
    let config_data = match digest_from_path(&entry.config) {
        Some(d) => src.read_blob(&entry.config, &entry.config, &d, None)?,
        None => src.read_small(&entry.config)?,
    };
    let config_digest = super::source::digest_of(sha2::Digest::new_with_prefix(&config_data));
    let config_what = src.describe(&entry.config);
    let config: ImageConfig = parse(&config_data, &config_what)?;
    let diff_ids = diff_ids(&config, entry.layers.len(), &config_what)?;
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(path, diff_id)| {
            let digest = if path.starts_with("blobs/") {
                digest_from_path(path)
            } else {
                None
            };
            LayerRef {
                path: path.clone(),
                label: match &digest {
                    Some(d) => d.0.clone(),
                    None => format!("{path} ({})", diff_id.0),
                },
                digest,
                size: None,
                diff_id,
            }
        })
        .collect();
    Ok(Plan {
        kind: "docker-archive",
        manifest_digest: config_digest.clone(),
        config_digest,
        config,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(os: &str, arch: &str) -> Descriptor {
        Descriptor {
            media_type: MT_OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: None,
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn the_platform_is_linux_amd64_else_the_only_one() {
        let descs = vec![
            desc("linux", "arm64"),
            desc("linux", "amd64"),
            desc("unknown", "unknown"),
        ];
        assert_eq!(
            choose(&descs, "i").unwrap().platform.as_ref().unwrap().architecture,
            "amd64"
        );
        let descs = vec![desc("linux", "arm64"), desc("unknown", "unknown")];
        assert_eq!(
            choose(&descs, "i").unwrap().platform.as_ref().unwrap().architecture,
            "arm64"
        );
        let descs = vec![desc("linux", "arm64"), desc("linux", "s390x")];
        let err = choose(&descs, "i").unwrap_err().to_string();
        assert!(err.contains("linux/arm64, linux/s390x"), "{err}");
    }

    #[test]
    fn docker_paths_imply_digests() {
        let hex = "ab".repeat(32);
        assert_eq!(digest_from_path(&format!("{hex}.json")).unwrap().hex(), hex);
        assert_eq!(digest_from_path(&format!("blobs/sha256/{hex}")).unwrap().hex(), hex);
        assert!(digest_from_path("abc/layer.tar").is_none());
        assert!(digest_from_path("config.json").is_none());
    }
}
