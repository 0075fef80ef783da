//! The firmware cache's index: one row per content-addressed image, one per chunk held.
//!
//! A chunk's row is written after its bytes are synced to the image file, so after a crash
//! the rows name exactly the chunks on disk and an upload (or an upstream fetch) resumes with
//! the rest. The chunk digests stay after completion: proofs for devices are computed from them
//! without reading the image.

use fleet_proto::merkle::Hash;
use fleet_proto::v1::Component;
use rusqlite::{params, OptionalExtension};

use super::{err, from_sql, to_sql, Store, StoreError};

/// An image as the cache knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageRow {
    /// Lowercase hex SHA-256 of the whole image: its name.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Number of chunks.
    pub chunk_count: u32,
    /// Merkle root over the chunk digests.
    pub merkle_root: Vec<u8>,
    /// Whether every chunk is held and the whole-image digest was checked.
    pub complete: bool,
}

impl ImageRow {
    /// The row for a manifest component.
    pub(crate) fn of(c: &Component) -> Self {
        ImageRow {
            sha256: hex::encode(&c.sha256),
            size: c.size,
            chunk_size: c.chunk_size,
            chunk_count: c.chunk_count,
            merkle_root: c.merkle_root.clone(),
            complete: false,
        }
    }

    /// Whether `c` describes this same image the same way (chunking and root included).
    pub(crate) fn matches(&self, c: &Component) -> bool {
        *self
            == ImageRow {
                complete: self.complete,
                ..ImageRow::of(c)
            }
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        sha256: r.get(0)?,
        size: from_sql(r.get(1)?),
        chunk_size: r.get(2)?,
        chunk_count: r.get(3)?,
        merkle_root: r.get(4)?,
        complete: r.get::<_, i64>(5)? != 0,
    })
}

impl Store {
    /// Records an image (if new) and returns what is stored for its digest. The caller checks
    /// [`ImageRow::matches`]: one digest chunked two ways is refused, not mixed.
    pub(crate) fn put_image(
        &mut self,
        image: &ImageRow,
        now_ms: u64,
    ) -> Result<ImageRow, StoreError> {
        self.conn
            .execute(
                "INSERT INTO images (sha256, size, chunk_size, chunk_count, merkle_root, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (sha256) DO NOTHING",
                params![
                    image.sha256,
                    to_sql(image.size),
                    image.chunk_size,
                    image.chunk_count,
                    image.merkle_root,
                    to_sql(now_ms)
                ],
            )
            .map_err(|e| err(&self.path, e))?;
        self.image(&image.sha256)?
            .ok_or_else(|| err(&self.path, rusqlite::Error::QueryReturnedNoRows))
    }

    /// The image named by `sha256` (hex), if known.
    pub(crate) fn image(&self, sha256: &str) -> Result<Option<ImageRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT sha256, size, chunk_size, chunk_count, merkle_root, complete
                 FROM images WHERE sha256 = ?1",
                [sha256],
                row,
            )
            .optional()
            .map_err(|e| err(&self.path, e))
    }

    /// Records that chunk `idx` (with its digest) is on disk. Idempotent.
    pub(crate) fn put_image_chunk(
        &mut self,
        sha256: &str,
        idx: u32,
        digest: &Hash,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO image_chunks (sha256, idx, digest) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
                params![sha256, idx, digest.as_slice()],
            )
            .map(|_| ())
            .map_err(|e| err(&self.path, e))
    }

    /// Whether chunk `idx` is held, and how many chunks are held in all.
    pub(crate) fn image_chunk_held(
        &self,
        sha256: &str,
        idx: u32,
    ) -> Result<(bool, u32), StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) FILTER (WHERE idx = ?2), count(*)
                 FROM image_chunks WHERE sha256 = ?1",
                params![sha256, idx],
                |r| Ok((r.get::<_, i64>(0)? > 0, r.get(1)?)),
            )
            .map_err(|e| err(&self.path, e))
    }

    /// The chunks held, in index order, with their digests.
    pub(crate) fn image_chunks(&self, sha256: &str) -> Result<Vec<(u32, Hash)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT idx, digest FROM image_chunks WHERE sha256 = ?1 ORDER BY idx")
            .map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map([sha256], |r| {
                let digest: Vec<u8> = r.get(1)?;
                let digest: Hash = digest.as_slice().try_into().map_err(|_| {
                    rusqlite::Error::InvalidColumnType(
                        1,
                        "digest".into(),
                        rusqlite::types::Type::Blob,
                    )
                })?;
                Ok((r.get(0)?, digest))
            })
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| err(&self.path, e))
    }

    /// Marks an image complete (every chunk held, whole digest checked).
    pub(crate) fn set_image_complete(&mut self, sha256: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE images SET complete = 1 WHERE sha256 = ?1", [sha256])
            .map(|_| ())
            .map_err(|e| err(&self.path, e))
    }

    /// Forgets an image's held chunks (its file failed the whole-image check).
    pub(crate) fn reset_image(&mut self, sha256: &str) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM image_chunks WHERE sha256 = ?1", [sha256])
            .map(|_| ())
            .map_err(|e| err(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn component() -> Component {
        Component {
            name: "rootfs".into(),
            size: 5000,
            sha256: vec![0xab; 32],
            chunk_size: 1024,
            chunk_count: 5,
            merkle_root: vec![7; 32],
        }
    }

    #[test]
    fn images_and_chunks_are_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        let c = component();
        let img = s.put_image(&ImageRow::of(&c), 1).unwrap();
        assert!(img.matches(&c) && !img.complete);
        let mut other = c.clone();
        other.chunk_size = 2048;
        other.chunk_count = 3;
        // Same digest chunked differently: the stored row is returned and does not match.
        assert!(!s
            .put_image(&ImageRow::of(&other), 2)
            .unwrap()
            .matches(&other));
        s.put_image_chunk(&img.sha256, 3, &[3; 32]).unwrap();
        s.put_image_chunk(&img.sha256, 0, &[9; 32]).unwrap();
        s.put_image_chunk(&img.sha256, 3, &[3; 32]).unwrap();
        assert_eq!(s.image_chunk_held(&img.sha256, 3).unwrap(), (true, 2));
        assert_eq!(s.image_chunk_held(&img.sha256, 1).unwrap(), (false, 2));
        assert_eq!(
            s.image_chunks(&img.sha256).unwrap(),
            vec![(0, [9; 32]), (3, [3; 32])]
        );
        s.set_image_complete(&img.sha256).unwrap();
        assert!(s.image(&img.sha256).unwrap().unwrap().complete);
        s.reset_image(&img.sha256).unwrap();
        assert!(s.image_chunks(&img.sha256).unwrap().is_empty());
        assert!(s.image("00").unwrap().is_none());
    }
}
