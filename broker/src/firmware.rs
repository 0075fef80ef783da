//! The gateway's firmware cache on disk: images named by their SHA-256, filled chunk by chunk
//! (each chunk checked against the signed manifest's Merkle root before it is written), resumed
//! after a crash from the store's record of held chunks, and checked whole before use.
//!
//! Files in `DATA_DIR/firmware/`: `{sha256}.part` while incomplete, `{sha256}.img` once every
//! chunk is held and the whole-image digest matches. Names are validated hex, so nothing from
//! the wire becomes a path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fleet_proto::merkle::{self, ChunkCheckError};
use fleet_proto::v1::Component;
use sha2::{Digest as _, Sha256};

use crate::store::{ImageRow, Store, StoreError};

/// Why a firmware operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirmwareError {
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
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FirmwareError + '_ {
    move |source| FirmwareError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What accepting a chunk led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
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

/// The firmware directory.
#[derive(Debug, Clone)]
pub struct FirmwareDir {
    dir: PathBuf,
}

impl FirmwareDir {
    /// Opens (creating) `DATA_DIR/firmware`.
    pub fn open(data_dir: &Path) -> Result<Self, FirmwareError> {
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
    pub fn accept_chunk<P: AsRef<[u8]>>(
        &self,
        store: &mut Store,
        c: &Component,
        index: u32,
        data: &[u8],
        proof: &[P],
        now_ms: u64,
    ) -> Result<Accepted, FirmwareError> {
        let sha: [u8; 32] = c
            .sha256
            .as_slice()
            .try_into()
            .map_err(|_| FirmwareError::BadDigest(c.name.clone()))?;
        let (offset, digest) = merkle::verify_chunk(c, index, data, proof)?;
        let image = store.put_image(&ImageRow::of(c), now_ms)?;
        if !image.matches(c) {
            return Err(FirmwareError::Mismatch(image.sha256));
        }
        if image.complete {
            return Ok(Accepted::Duplicate);
        }
        let (already, held) = store.image_chunk_held(&image.sha256, index)?;
        if already {
            return Ok(Accepted::Duplicate);
        }
        let part = self.path(&sha, "part");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&part)
            .map_err(io_err(&part))?;
        f.write_all_at(data, offset).map_err(io_err(&part))?;
        f.sync_data().map_err(io_err(&part))?;
        store.put_image_chunk(&image.sha256, index, &digest)?;
        let count = held + 1;
        if count < c.chunk_count {
            return Ok(Accepted::Held { held: count });
        }
        self.finish(store, &sha, &image.sha256)?;
        Ok(Accepted::Complete)
    }

    /// Every chunk is held: hash the whole file, then publish it as `.img`.
    fn finish(&self, store: &mut Store, sha: &[u8; 32], name: &str) -> Result<(), FirmwareError> {
        let part = self.path(sha, "part");
        let mut f = File::open(&part).map_err(io_err(&part))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(io_err(&part))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        if h.finalize().as_slice() != sha {
            store.reset_image(name)?;
            fs::remove_file(&part).map_err(io_err(&part))?;
            return Err(FirmwareError::DigestMismatch(name.to_owned()));
        }
        let img = self.path(sha, "img");
        fs::rename(&part, &img).map_err(io_err(&img))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        store.set_image_complete(name)?;
        Ok(())
    }

    /// Reads `len` bytes at `offset` of a complete image.
    pub fn read(&self, sha: &[u8; 32], offset: u64, len: usize) -> Result<Vec<u8>, FirmwareError> {
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
    use fleet_proto::chunker::summarize;
    use fleet_proto::merkle::{Hash, MerkleTree};

    fn image(n: usize) -> (Vec<u8>, Component, MerkleTree) {
        let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        let c = summarize(data.as_slice(), 1024)
            .unwrap()
            .component("rootfs");
        let digests: Vec<Hash> = data.chunks(1024).map(merkle::chunk_digest).collect();
        (data, c, MerkleTree::from_chunk_digests(&digests).unwrap())
    }

    fn chunk(data: &[u8], i: u32) -> &[u8] {
        let s = i as usize * 1024;
        &data[s..(s + 1024).min(data.len())]
    }

    #[test]
    fn an_upload_resumes_after_a_restart_and_completes_verified() {
        let dir = tempfile::tempdir().unwrap();
        let (data, c, tree) = image(5 * 1024 - 100);
        let sha: [u8; 32] = c.sha256.as_slice().try_into().unwrap();
        {
            let mut store = Store::open_in(dir.path()).unwrap();
            let fw = FirmwareDir::open(dir.path()).unwrap();
            for i in [3, 0] {
                let got = fw
                    .accept_chunk(
                        &mut store,
                        &c,
                        i,
                        chunk(&data, i),
                        &tree.proof(i).unwrap(),
                        1,
                    )
                    .unwrap();
                assert!(matches!(got, Accepted::Held { .. }));
            }
            // A corrupt chunk is refused before anything is written.
            let mut bad = chunk(&data, 1).to_vec();
            bad[0] ^= 1;
            assert!(matches!(
                fw.accept_chunk(&mut store, &c, 1, &bad, &tree.proof(1).unwrap(), 1),
                Err(FirmwareError::Chunk(_))
            ));
            assert!(matches!(
                fw.read(&sha, 0, 10),
                Err(FirmwareError::Missing(_))
            ));
        }
        // "Restart": a new store handle and directory see the two chunks held.
        let mut store = Store::open_in(dir.path()).unwrap();
        let fw = FirmwareDir::open(dir.path()).unwrap();
        let hex = hex::encode(sha);
        assert_eq!(store.image_chunks(&hex).unwrap().len(), 2);
        assert_eq!(
            fw.accept_chunk(
                &mut store,
                &c,
                0,
                chunk(&data, 0),
                &tree.proof(0).unwrap(),
                2
            )
            .unwrap(),
            Accepted::Duplicate
        );
        let mut last = Accepted::Duplicate;
        for i in [1, 2, 4] {
            last = fw
                .accept_chunk(
                    &mut store,
                    &c,
                    i,
                    chunk(&data, i),
                    &tree.proof(i).unwrap(),
                    2,
                )
                .unwrap();
        }
        assert_eq!(last, Accepted::Complete);
        assert!(store.image(&hex).unwrap().unwrap().complete);
        assert_eq!(fw.read(&sha, 0, data.len()).unwrap(), data);
        assert_eq!(fw.read(&sha, 4096, 10).unwrap(), &data[4096..4106]);
    }

    #[test]
    fn an_inconsistent_manifest_is_caught_by_the_whole_image_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (data, mut c, tree) = image(2048);
        // Right chunks and root, wrong whole-image digest.
        c.sha256 = vec![0x11; 32];
        let mut store = Store::open_in(dir.path()).unwrap();
        let fw = FirmwareDir::open(dir.path()).unwrap();
        fw.accept_chunk(
            &mut store,
            &c,
            0,
            chunk(&data, 0),
            &tree.proof(0).unwrap(),
            1,
        )
        .unwrap();
        assert!(matches!(
            fw.accept_chunk(
                &mut store,
                &c,
                1,
                chunk(&data, 1),
                &tree.proof(1).unwrap(),
                1
            ),
            Err(FirmwareError::DigestMismatch(_))
        ));
        assert!(store
            .image_chunks(&hex::encode([0x11; 32]))
            .unwrap()
            .is_empty());
    }
}
