//! Streaming chunker: reads an image once, in chunk-sized pieces, and yields each chunk with
//! its digest while accumulating the whole-image SHA-256 and the Merkle root. Memory is one
//! chunk buffer plus 32 bytes per chunk for the digests, whatever the image size.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::merkle::{self, Hash};
use crate::v1;

/// Smallest chunk size a manifest may name (1 KiB).
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// Largest chunk size a manifest may name (1 MiB): bounds a device's receive buffer.
pub const MAX_CHUNK_SIZE: u32 = 1 << 20;
/// Chunk size used when none is given (16 KiB).
pub const DEFAULT_CHUNK_SIZE: u32 = 16 * 1024;

/// Why an image cannot be chunked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The chunk size is outside [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes")]
    ChunkSize(u32),
    /// The image is empty.
    #[error("image is empty")]
    EmptyImage,
    /// The image has more than `u32::MAX` chunks at this chunk size.
    #[error("image has too many chunks for chunk size {0}")]
    TooManyChunks(u32),
    /// Reading the image failed.
    #[error("reading the image: {0}")]
    Io(#[from] io::Error),
}

/// The SHA-256 of everything `reader` yields (a whole image, as a manifest names it), read in
/// 256 KiB pieces.
pub fn sha256_of(mut reader: impl Read) -> io::Result<Hash> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize().into());
        }
        h.update(&buf[..n]);
    }
}

/// Checks a chunk size against the manifest bounds.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), ChunkError> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(ChunkError::ChunkSize(chunk_size))
    }
}

/// Number of chunks of an image of `size` bytes, or `None` if it does not fit a `u32`.
pub fn chunk_count(size: u64, chunk_size: u32) -> Option<u32> {
    if chunk_size == 0 {
        return None;
    }
    u32::try_from(size.div_ceil(u64::from(chunk_size))).ok()
}

/// Byte offset and length of chunk `index`, or `None` if the index is past the end (or
/// `chunk_size` is 0). Safe for any values: the offset is computed with checked arithmetic.
pub fn chunk_span(index: u32, size: u64, chunk_size: u32) -> Option<(u64, usize)> {
    if chunk_size == 0 {
        return None;
    }
    let offset = u64::from(index).checked_mul(u64::from(chunk_size))?;
    if offset >= size {
        return None;
    }
    let len = (size - offset).min(u64::from(chunk_size));
    // len <= chunk_size, a u32.
    Some((offset, len as usize))
}

/// One chunk, borrowed from the chunker's buffer until the next call.
#[derive(Debug)]
pub struct ChunkRef<'a> {
    /// Chunk index.
    pub index: u32,
    /// Byte offset of the chunk in the image.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: &'a [u8],
    /// SHA-256 of `data`.
    pub digest: Hash,
}

/// Everything a manifest component states about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// Image size in bytes.
    pub size: u64,
    /// SHA-256 of the whole image.
    pub sha256: Hash,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Digest of each chunk, in order.
    pub chunk_digests: Vec<Hash>,
    /// Merkle root over `chunk_digests`.
    pub merkle_root: Hash,
}

impl ImageSummary {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        // The chunker refuses images with more than u32::MAX chunks.
        self.chunk_digests.len() as u32
    }

    /// The manifest component describing this image under `name`.
    pub fn component(&self, name: &str) -> v1::Component {
        v1::Component {
            name: name.to_owned(),
            size: self.size,
            sha256: self.sha256.to_vec(),
            chunk_size: self.chunk_size,
            chunk_count: self.chunk_count(),
            merkle_root: self.merkle_root.to_vec(),
        }
    }
}

/// Reads an image chunk by chunk.
#[derive(Debug)]
pub struct Chunker<R> {
    reader: R,
    chunk_size: u32,
    buf: Vec<u8>,
    offset: u64,
    whole: Sha256,
    digests: Vec<Hash>,
    eof: bool,
}

impl<R: Read> Chunker<R> {
    /// A chunker over `reader` with chunks of `chunk_size` bytes.
    pub fn new(reader: R, chunk_size: u32) -> Result<Self, ChunkError> {
        check_chunk_size(chunk_size)?;
        Ok(Self {
            reader,
            chunk_size,
            buf: Vec::with_capacity(chunk_size as usize),
            offset: 0,
            whole: Sha256::new(),
            digests: Vec::new(),
            eof: false,
        })
    }

    /// The next chunk, or `None` at the end of the image.
    pub fn next_chunk(&mut self) -> Result<Option<ChunkRef<'_>>, ChunkError> {
        if self.eof {
            return Ok(None);
        }
        self.buf.clear();
        let want = u64::from(self.chunk_size);
        (&mut self.reader).take(want).read_to_end(&mut self.buf)?;
        if self.buf.len() < self.chunk_size as usize {
            self.eof = true;
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        let index = u32::try_from(self.digests.len())
            .map_err(|_| ChunkError::TooManyChunks(self.chunk_size))?;
        let digest = merkle::chunk_digest(&self.buf);
        self.whole.update(&self.buf);
        self.digests.push(digest);
        let offset = self.offset;
        self.offset += self.buf.len() as u64;
        Ok(Some(ChunkRef {
            index,
            offset,
            data: &self.buf,
            digest,
        }))
    }

    /// Reads whatever is left and returns the summary of the whole image.
    pub fn finish(mut self) -> Result<ImageSummary, ChunkError> {
        while self.next_chunk()?.is_some() {}
        let merkle_root = merkle::root(&self.digests).map_err(|_| ChunkError::EmptyImage)?;
        Ok(ImageSummary {
            size: self.offset,
            sha256: self.whole.finalize().into(),
            chunk_size: self.chunk_size,
            chunk_digests: self.digests,
            merkle_root,
        })
    }
}

/// Summarises an image in one pass.
pub fn summarize<R: Read>(reader: R, chunk_size: u32) -> Result<ImageSummary, ChunkError> {
    Chunker::new(reader, chunk_size)?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_is_the_digest_of_the_whole_input() {
        // Longer than one read buffer, so the pieces are joined.
        let data = image(600 * 1024 + 7);
        let want: Hash = Sha256::digest(&data).into();
        assert_eq!(sha256_of(&data[..]).unwrap_or_else(|e| panic!("{e}")), want);
        assert_eq!(
            sha256_of(&[][..]).unwrap_or_else(|e| panic!("{e}")),
            <[u8; 32]>::from(Sha256::digest(b""))
        );
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn chunks_cover_the_image_exactly() {
        for len in [1usize, 1023, 1024, 1025, 4096, 10_000] {
            let img = image(len);
            let mut c = Chunker::new(&img[..], 1024).unwrap_or_else(|e| panic!("{e}"));
            let mut rebuilt = Vec::new();
            let mut expect_index = 0;
            while let Some(ch) = c.next_chunk().unwrap_or_else(|e| panic!("{e}")) {
                assert_eq!(ch.index, expect_index);
                assert_eq!(ch.offset, rebuilt.len() as u64);
                assert_eq!(ch.digest, merkle::chunk_digest(ch.data));
                assert_eq!(
                    chunk_span(ch.index, len as u64, 1024),
                    Some((ch.offset, ch.data.len()))
                );
                rebuilt.extend_from_slice(ch.data);
                expect_index += 1;
            }
            assert_eq!(rebuilt, img);
            let s = c.finish().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.size, len as u64);
            assert_eq!(s.chunk_count(), chunk_count(len as u64, 1024).unwrap_or(0));
            assert_eq!(s.chunk_count(), expect_index);
            assert_eq!(s.sha256, <[u8; 32]>::from(Sha256::digest(&img)));
            assert_eq!(chunk_span(s.chunk_count(), len as u64, 1024), None);
        }
    }

    #[test]
    fn summary_matches_the_merkle_tree() {
        let img = image(5 * 1024 + 7);
        let s = summarize(&img[..], 1024).unwrap_or_else(|e| panic!("{e}"));
        let digests: Vec<Hash> = img.chunks(1024).map(merkle::chunk_digest).collect();
        assert_eq!(s.chunk_digests, digests);
        assert_eq!(Ok(s.merkle_root), merkle::root(&digests));
        let comp = s.component("rootfs");
        assert_eq!((comp.chunk_count, comp.size), (6, 5 * 1024 + 7));
    }

    #[test]
    fn counts_and_spans_at_the_extremes() {
        assert_eq!(chunk_count(u64::MAX, MAX_CHUNK_SIZE), None);
        assert_eq!(chunk_count(u64::MAX, 1), None);
        assert_eq!(chunk_count(1, 0), None);
        assert_eq!(
            chunk_count(
                u64::from(u32::MAX) * u64::from(MIN_CHUNK_SIZE),
                MIN_CHUNK_SIZE
            ),
            Some(u32::MAX)
        );
        assert_eq!(
            chunk_count(
                u64::from(u32::MAX) * u64::from(MIN_CHUNK_SIZE) + 1,
                MIN_CHUNK_SIZE
            ),
            None
        );
        let last = u64::from(u32::MAX - 1) * u64::from(MAX_CHUNK_SIZE);
        assert_eq!(
            chunk_span(u32::MAX - 1, u64::MAX, MAX_CHUNK_SIZE),
            Some((last, MAX_CHUNK_SIZE as usize))
        );
        assert_eq!(
            chunk_span(u32::MAX, u64::MAX, u32::MAX),
            Some((u64::from(u32::MAX) * u64::from(u32::MAX), u32::MAX as usize))
        );
        assert_eq!(chunk_span(u32::MAX, 5, 1024), None);
        assert_eq!(chunk_span(0, 5, 0), None);
        assert_eq!(chunk_span(0, 0, 1024), None);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            summarize(&b""[..], 1024),
            Err(ChunkError::EmptyImage)
        ));
        assert!(matches!(
            Chunker::new(&b"x"[..], 512),
            Err(ChunkError::ChunkSize(512))
        ));
        assert!(matches!(
            Chunker::new(&b"x"[..], MAX_CHUNK_SIZE + 1),
            Err(ChunkError::ChunkSize(_))
        ));
    }

    #[test]
    fn read_errors_surface() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        assert!(matches!(summarize(Broken, 1024), Err(ChunkError::Io(_))));
    }
}
