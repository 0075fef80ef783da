//! The gateway's firmware cache on disk: images named by their SHA-256, filled chunk by chunk
//! (each chunk checked against the signed manifest's Merkle root before it is written), resumed
//! after a crash from the store's record of held chunks, and checked whole before use.
//!
//! Files in `DATA_DIR/firmware/`: `{sha256}.part` while incomplete, `{sha256}.img` once every
//! chunk is held and the whole-image digest matches. Names are validated hex, so nothing from
//! the wire becomes a path.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fleet_proto::merkle::{self, ChunkCheckError};
use fleet_proto::v1::Component;

use crate::store::{ImageRow, SharedStore, StoreError};

/// Why a firmware operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FirmwareError {
    /// The component's digest is not 32 bytes.
    #[error("component {0:?} has no usable SHA-256")]
    BadDigest(String),
    /// The same image digest is already known with another chunking or root.
    #[error("image {0} is already known with another chunk size or Merkle root")]
    Mismatch(String),
    /// The chunk is not the one the manifest describes.
    #[error(transparent)]
    Chunk(#[from] ChunkCheckError),
    /// All chunks verified, yet the whole image's SHA-256 differs (the manifest is inconsistent):
    /// the chunks are dropped.
    #[error("image {0}: the whole-image SHA-256 does not match; its chunks were dropped")]
    DigestMismatch(String),
    /// The image is not (completely) in the cache.
    #[error("image {0} is not in the cache")]
    Missing(String),
    /// Reading or writing the files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task doing the file work died (a bug: it panicked).
    #[error("firmware file task failed: {0}")]
    Task(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FirmwareError + '_ {
    move |source| FirmwareError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What accepting a chunk led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// Written; `held` of the image's chunks are now on disk.
    Held {
        /// Chunks held.
        held: u32,
    },
    /// Already held before: nothing written.
    Duplicate,
    /// This chunk completed the image, and its whole digest matched.
    Complete,
}

/// What the store says about an offered chunk.
enum Plan {
    /// The digest is known with another chunking or root.
    Mismatch,
    /// Held already (or the image is complete): nothing to do.
    Duplicate,
    /// Not held: write it.
    Write,
    /// Held, and so is every other chunk, but the image was not finished (a crash during the
    /// final check): finish it now.
    Finish,
}

/// Runs file work on the blocking pool.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, FirmwareError> + Send + 'static,
) -> Result<R, FirmwareError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FirmwareError::Task(e.to_string()))?
}

/// Writes `data` at `offset` of `path` (created if needed) and syncs it.
fn write_synced(path: &Path, offset: u64, data: &[u8]) -> Result<(), FirmwareError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all_at(data, offset).map_err(io_err(path))?;
    f.sync_data().map_err(io_err(path))
}

/// The SHA-256 of a whole file.
fn sha256_file(path: &Path) -> Result<[u8; 32], FirmwareError> {
    let f = File::open(path).map_err(io_err(path))?;
    fleet_proto::chunker::sha256_of(f).map_err(io_err(path))
}

/// The firmware directory.
#[derive(Debug, Clone)]
pub(crate) struct FirmwareDir {
    dir: PathBuf,
}

impl FirmwareDir {
    /// Opens (creating) `DATA_DIR/firmware`.
    pub(crate) fn open(data_dir: &Path) -> Result<Self, FirmwareError> {
        let dir = data_dir.join("firmware");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(FirmwareDir { dir })
    }

    fn path(&self, sha: &[u8; 32], ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", hex::encode(sha)))
    }

    /// Checks chunk `index` of component `c` against its Merkle root, writes it at its offset
    /// (synced), then records it in the store. When it was the last one, checks the whole image
    /// and makes it available.
    ///
    /// Only the store lookups and records run under the store's lock (short transactions);
    /// writing and syncing the chunk and hashing the whole image run outside it, so devices'
    /// status acknowledgements do not wait behind an upload. A chunk is recorded as held only
    /// after its bytes are durable, and an image is marked complete only after its file is
    /// checked and renamed, so a crash at any point leaves the record true; an image whose
    /// every chunk was recorded but which was not finished (a crash during the final check) is
    /// finished by the next chunk offered for it.
    ///
    /// Uploads of one image must not run concurrently (the update server handles one API call
    /// at a time).
    pub(crate) async fn accept_chunk<P: AsRef<[u8]>>(
        &self,
        store: &SharedStore,
        c: &Component,
        index: u32,
        data: Vec<u8>,
        proof: &[P],
        now_ms: u64,
    ) -> Result<Accepted, FirmwareError> {
        let sha: [u8; 32] = c
            .sha256
            .as_slice()
            .try_into()
            .map_err(|_| FirmwareError::BadDigest(c.name.clone()))?;
        let (offset, digest) = merkle::verify_chunk(c, index, &data, proof)?;
        let component = c.clone();
        let name = hex::encode(sha);
        let chunk_count = c.chunk_count;
        let plan = store
            .call("firmware: look up a chunk", move |s| {
                let image = s.put_image(&ImageRow::of(&component), now_ms)?;
                if !image.matches(&component) {
                    return Ok(Plan::Mismatch);
                }
                if image.complete {
                    return Ok(Plan::Duplicate);
                }
                let (already, held) = s.image_chunk_held(&image.sha256, index)?;
                Ok(match (already, held >= chunk_count) {
                    (false, _) => Plan::Write,
                    (true, true) => Plan::Finish,
                    (true, false) => Plan::Duplicate,
                })
            })
            .await?;
        match plan {
            Plan::Mismatch => return Err(FirmwareError::Mismatch(name)),
            Plan::Duplicate => return Ok(Accepted::Duplicate),
            Plan::Finish => {}
            Plan::Write => {
                let part = self.path(&sha, "part");
                blocking(move || write_synced(&part, offset, &data)).await?;
                let n = name.clone();
                let held = store
                    .call("firmware: record a chunk", move |s| {
                        s.put_image_chunk(&n, index, &digest)?;
                        Ok(s.image_chunk_held(&n, index)?.1)
                    })
                    .await?;
                if held < chunk_count {
                    return Ok(Accepted::Held { held });
                }
            }
        }
        self.finish(store, sha, name).await?;
        Ok(Accepted::Complete)
    }

    /// Every chunk is held: hash the whole file, then publish it as `.img` and mark it
    /// complete; on a digest mismatch forget its chunks and remove the file.
    async fn finish(
        &self,
        store: &SharedStore,
        sha: [u8; 32],
        name: String,
    ) -> Result<(), FirmwareError> {
        let part = self.path(&sha, "part");
        let p = part.clone();
        let digest = blocking(move || sha256_file(&p)).await?;
        if digest != sha {
            let n = name.clone();
            store
                .call("firmware: drop a bad image", move |s| s.reset_image(&n))
                .await?;
            blocking(move || fs::remove_file(&part).map_err(io_err(&part))).await?;
            return Err(FirmwareError::DigestMismatch(name));
        }
        let img = self.path(&sha, "img");
        let dir = self.dir.clone();
        blocking(move || {
            fs::rename(&part, &img).map_err(io_err(&img))?;
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&dir))
        })
        .await?;
        store
            .call("firmware: mark an image complete", move |s| {
                s.set_image_complete(&name)
            })
            .await?;
        Ok(())
    }

    /// Reads `len` bytes at `offset` of a complete image.
    pub(crate) fn read(
        &self,
        sha: &[u8; 32],
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, FirmwareError> {
        let img = self.path(sha, "img");
        let f = File::open(&img).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => FirmwareError::Missing(hex::encode(sha)),
            _ => FirmwareError::Io {
                path: img.clone(),
                source: e,
            },
        })?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).map_err(io_err(&img))?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::metrics::Metrics;
    use crate::store::Store;
    use fleet_proto::chunker::summarize;
    use fleet_proto::merkle::{Hash, MerkleTree};
    use std::sync::Arc;

    fn image(n: usize) -> (Vec<u8>, Component, MerkleTree) {
        let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        let c = summarize(data.as_slice(), 1024)
            .unwrap()
            .component("rootfs");
        let digests: Vec<Hash> = data.chunks(1024).map(merkle::chunk_digest).collect();
        (data, c, MerkleTree::from_chunk_digests(&digests).unwrap())
    }

    fn chunk(data: &[u8], i: u32) -> Vec<u8> {
        let s = i as usize * 1024;
        data[s..(s + 1024).min(data.len())].to_vec()
    }

    fn open(dir: &Path) -> (SharedStore, FirmwareDir) {
        let store = SharedStore::new(Store::open_in(dir).unwrap(), Arc::new(Metrics::default()));
        (store, FirmwareDir::open(dir).unwrap())
    }

    async fn offer(
        fw: &FirmwareDir,
        store: &SharedStore,
        (data, c, tree): &(Vec<u8>, Component, MerkleTree),
        i: u32,
    ) -> Result<Accepted, FirmwareError> {
        fw.accept_chunk(store, c, i, chunk(data, i), &tree.proof(i).unwrap(), 1)
            .await
    }

    async fn held(store: &SharedStore, hex: &str) -> usize {
        let hex = hex.to_owned();
        store
            .call("test", move |s| s.image_chunks(&hex))
            .await
            .unwrap()
            .len()
    }

    #[tokio::test]
    async fn an_upload_resumes_after_a_restart_and_completes_verified() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(5 * 1024 - 100);
        let (data, c, tree) = &img;
        let sha: [u8; 32] = c.sha256.as_slice().try_into().unwrap();
        {
            let (store, fw) = open(dir.path());
            for i in [3, 0] {
                let got = offer(&fw, &store, &img, i).await.unwrap();
                assert!(matches!(got, Accepted::Held { .. }));
            }
            // A corrupt chunk is refused before anything is written.
            let mut bad = chunk(data, 1);
            bad[0] ^= 1;
            assert!(matches!(
                fw.accept_chunk(&store, c, 1, bad, &tree.proof(1).unwrap(), 1)
                    .await,
                Err(FirmwareError::Chunk(_))
            ));
            assert!(matches!(
                fw.read(&sha, 0, 10),
                Err(FirmwareError::Missing(_))
            ));
        }
        // "Restart": a new store handle and directory see the two chunks held.
        let (store, fw) = open(dir.path());
        let hex = hex::encode(sha);
        assert_eq!(held(&store, &hex).await, 2);
        assert_eq!(
            offer(&fw, &store, &img, 0).await.unwrap(),
            Accepted::Duplicate
        );
        let mut last = Accepted::Duplicate;
        for i in [1, 2, 4] {
            last = offer(&fw, &store, &img, i).await.unwrap();
        }
        assert_eq!(last, Accepted::Complete);
        let h = hex.clone();
        let complete = store
            .call("test", move |s| s.image(&h))
            .await
            .unwrap()
            .unwrap()
            .complete;
        assert!(complete);
        assert_eq!(fw.read(&sha, 0, data.len()).unwrap(), *data);
        assert_eq!(fw.read(&sha, 4096, 10).unwrap(), &data[4096..4106]);
        assert_eq!(
            offer(&fw, &store, &img, 2).await.unwrap(),
            Accepted::Duplicate
        );
    }

    #[tokio::test]
    async fn an_image_left_unfinished_by_a_crash_is_finished_by_the_next_offer() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(3 * 1024);
        let (data, c, _) = &img;
        let sha: [u8; 32] = c.sha256.as_slice().try_into().unwrap();
        // The state a crash after the last chunk's record, before the final check, leaves:
        // every chunk durable and recorded, the file still `.part`, the image not complete.
        {
            let mut s = Store::open_in(dir.path()).unwrap();
            let fw = FirmwareDir::open(dir.path()).unwrap();
            let row = s.put_image(&ImageRow::of(c), 1).unwrap();
            for i in 0..3 {
                let bytes = chunk(data, i);
                write_synced(&fw.path(&sha, "part"), u64::from(i) * 1024, &bytes).unwrap();
                s.put_image_chunk(&row.sha256, i, &merkle::chunk_digest(&bytes))
                    .unwrap();
            }
        }
        let (store, fw) = open(dir.path());
        assert!(matches!(
            fw.read(&sha, 0, 10),
            Err(FirmwareError::Missing(_))
        ));
        assert_eq!(
            offer(&fw, &store, &img, 1).await.unwrap(),
            Accepted::Complete
        );
        assert_eq!(fw.read(&sha, 0, data.len()).unwrap(), *data);
    }

    #[tokio::test]
    async fn an_inconsistent_manifest_is_caught_by_the_whole_image_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (data, mut c, tree) = image(2048);
        // Right chunks and root, wrong whole-image digest.
        c.sha256 = vec![0x11; 32];
        let img = (data, c, tree);
        let (store, fw) = open(dir.path());
        offer(&fw, &store, &img, 0).await.unwrap();
        assert!(matches!(
            offer(&fw, &store, &img, 1).await,
            Err(FirmwareError::DigestMismatch(_))
        ));
        assert_eq!(held(&store, &hex::encode([0x11; 32])).await, 0);
        assert!(!fw.path(&[0x11; 32], "part").exists());
    }
}
