//! `POOL/pool.json`: which origin, which snapshots with which COW, chunk size
//! and store type, and what state each is in. Updated atomically (write a
//! temporary file, fsync, rename over, fsync the directory), so a crash leaves
//! either the old or the new manifest, never a torn one.

use super::PoolError;
use crate::store::StoreType;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The manifest's file name inside the pool directory.
pub const MANIFEST: &str = "pool.json";
/// The version this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Upper bound on the manifest's size: a hostile or broken file is refused
/// before it is read into memory.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// The origin device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OriginEntry {
    /// Path as stored: relative to the pool directory for files the pool
    /// created, absolute otherwise.
    pub path: PathBuf,
    /// True when `dmsnap create --size` made the image (it is the pool's).
    pub created: bool,
}

/// Lifecycle of a snapshot in the manifest.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EntryState {
    /// Normal: exported, gets exceptions.
    Active,
    /// A merge into the origin was started; it resumes on the next `serve` or `merge`.
    Merging,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub name: String,
    /// COW path, stored like [`OriginEntry::path`].
    pub cow: PathBuf,
    /// True when the pool made the COW file (it is deleted with the snapshot).
    pub cow_created: bool,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    pub store: StoreType,
    pub state: EntryState,
    /// Transient (`N`) snapshots only: true once a daemon activated it. Its
    /// exceptions live in that daemon's memory, so it cannot outlive it.
    #[serde(default)]
    pub activated: bool,
}

/// The whole manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub origin: OriginEntry,
    #[serde(default)]
    pub snapshots: Vec<SnapshotEntry>,
    /// Names of the snapshots whose merge completed (they left `snapshots`),
    /// oldest first, at most [`MAX_MERGED`]: `merge NAME` after the end of
    /// its merge reports that it completed instead of "no such snapshot".
    /// A new snapshot of the same name takes the name back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

/// How many completed merges the manifest remembers.
pub const MAX_MERGED: usize = 32;

impl Manifest {
    pub fn new(origin: OriginEntry) -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            origin,
            snapshots: Vec::new(),
            merged: Vec::new(),
        }
    }

    /// Record a new snapshot (its name is no longer that of a merged one).
    pub fn add_snapshot(&mut self, e: SnapshotEntry) {
        self.merged.retain(|n| *n != e.name);
        self.snapshots.push(e);
    }

    /// Snapshot `name` merged into the origin: it leaves the pool, its name
    /// is remembered.
    pub fn record_merged(&mut self, name: &str) {
        self.snapshots.retain(|s| s.name != name);
        self.merged.retain(|n| n != name);
        self.merged.push(name.to_string());
        let excess = self.merged.len().saturating_sub(MAX_MERGED);
        self.merged.drain(..excess);
    }

    /// True when the last snapshot named `name` left the pool by a merge.
    pub fn was_merged(&self, name: &str) -> bool {
        self.snapshot(name).is_none() && self.merged.iter().any(|n| n == name)
    }

    /// Read and validate `dir/pool.json`.
    pub fn load(dir: &Path) -> Result<Self, PoolError> {
        let path = dir.join(MANIFEST);
        let meta = fs::metadata(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                PoolError::NotAPool(dir.to_path_buf())
            } else {
                PoolError::ReadManifest {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(PoolError::BadManifest {
                path,
                why: format!("it is {} bytes, more than a manifest can be", meta.len()),
            });
        }
        let bytes = fs::read(&path).map_err(|source| PoolError::ReadManifest {
            path: path.clone(),
            source,
        })?;
        let m: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| PoolError::ParseManifest {
                path: path.clone(),
                source,
            })?;
        m.validate()
            .map_err(|why| PoolError::BadManifest { path, why })?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        if self.version != MANIFEST_VERSION {
            return Err(format!(
                "manifest version {} is not supported (this dmsnap reads version {MANIFEST_VERSION})",
                self.version
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut merging = 0;
        for s in &self.snapshots {
            check_name(&s.name)?;
            if !seen.insert(&s.name) {
                return Err(format!("snapshot '{}' is listed twice", s.name));
            }
            crate::units::ChunkSize::from_bytes(s.chunk_size)
                .map_err(|e| format!("snapshot '{}': {e}", s.name))?;
            if s.state == EntryState::Merging {
                merging += 1;
            }
        }
        if merging > 1 {
            return Err("more than one snapshot is marked as merging".into());
        }
        if self.merged.len() > MAX_MERGED {
            return Err(format!(
                "it remembers {} merged snapshots, more than {MAX_MERGED}",
                self.merged.len()
            ));
        }
        Ok(())
    }

    /// Write atomically: temp file, fsync, rename, fsync directory.
    pub fn save(&self, dir: &Path) -> Result<(), PoolError> {
        let path = dir.join(MANIFEST);
        let tmp = dir.join(format!(".{MANIFEST}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            // A failed write leaves no temporary file behind.
            let guard = RemoveOnDrop(&tmp);
            let mut text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            text.push(b'\n');
            f.write_all(&text)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            std::mem::forget(guard);
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|source| PoolError::WriteManifest { path, source })
    }

    pub fn snapshot(&self, name: &str) -> Option<&SnapshotEntry> {
        self.snapshots.iter().find(|s| s.name == name)
    }
    pub fn snapshot_mut(&mut self, name: &str) -> Option<&mut SnapshotEntry> {
        self.snapshots.iter_mut().find(|s| s.name == name)
    }
    pub fn merging(&self) -> Option<&SnapshotEntry> {
        self.snapshots
            .iter()
            .find(|s| s.state == EntryState::Merging)
    }
}

struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}

/// Snapshot names become export names and file names: keep them plain.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "origin"
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid snapshot name (1-128 of A-Z a-z 0-9 - _ . +, not starting with '.' or '-', and not 'origin')"
        ))
    }
}

/// Resolve a stored path against the pool directory.
pub fn resolve(dir: &Path, stored: &Path) -> PathBuf {
    if stored.is_absolute() {
        stored.to_path_buf()
    } else {
        dir.join(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new(OriginEntry {
            path: "origin.img".into(),
            created: true,
        });
        m.snapshots.push(SnapshotEntry {
            name: "s1".into(),
            cow: "s1.cow".into(),
            cow_created: true,
            chunk_size: 4096,
            store: StoreType::Persistent,
            state: EntryState::Active,
            activated: false,
        });
        m
    }

    #[test]
    fn save_load_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let m = sample();
        m.save(d.path()).unwrap();
        assert_eq!(Manifest::load(d.path()).unwrap(), m);
        let text = fs::read_to_string(d.path().join(MANIFEST)).unwrap();
        assert!(text.contains("\"store\": \"P\""), "{text}");
        assert!(!d.path().join(".pool.json.tmp").exists());
    }

    #[test]
    fn bad_manifests_are_refused_with_a_reason() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Manifest::load(d.path()),
            Err(PoolError::NotAPool(_))
        ));
        fs::write(d.path().join(MANIFEST), b"{not json").unwrap();
        assert!(matches!(
            Manifest::load(d.path()),
            Err(PoolError::ParseManifest { .. })
        ));
        let mut m = sample();
        m.snapshots.push(m.snapshots[0].clone());
        fs::write(d.path().join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        let e = Manifest::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("bad pool manifest"), "{e}");
        let mut m = sample();
        m.snapshots[0].chunk_size = 3000;
        fs::write(d.path().join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(Manifest::load(d.path()).is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("s1").is_ok());
        assert!(check_name("daily-2026.11.21").is_ok());
        for bad in ["", "origin", ".x", "-x", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
