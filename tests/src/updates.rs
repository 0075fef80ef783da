//! Update fixtures: images, authority keys, and publishing an update through the SDK.

use std::path::{Path, PathBuf};

use cloud_client::{build_update, FleetClient, ImageSpec, UpdateRecord, UpdateSpec};
use fleet_proto::signing::UpdateSigner;

/// Writes `size` deterministic pseudo-random bytes (seeded) to `path` and returns them.
pub fn write_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        data.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    data
}

/// The update authority's key written to `dir/authority.pem` (and `.pem.pub`): the signer and
/// the public key's path. `dir` must hold a gateway's data (start the `GatewayProc` first): the
/// key is its development PKI's `updates` key (`data/pki/trust/updates-1.key`), the one the
/// devices' root of trust names. (A fresh key would be refused by every device.)
pub fn authority(dir: &Path) -> (UpdateSigner, PathBuf, PathBuf) {
    let pki_key = dir.join("data/pki/trust/updates-1.key");
    let pem = std::fs::read_to_string(&pki_key).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: start the gateway in {} before asking for its updates key",
            pki_key.display(),
            dir.display()
        )
    });
    let signer =
        UpdateSigner::from_pkcs8_pem(&pem).unwrap_or_else(|e| panic!("{}: {e}", pki_key.display()));
    let private = dir.join("authority.pem");
    let public = dir.join("authority.pem.pub");
    let pem = signer.to_pkcs8_pem().unwrap_or_else(|e| panic!("key: {e}"));
    std::fs::write(&private, pem).unwrap_or_else(|e| panic!("{}: {e}", private.display()));
    let pubpem = signer
        .public_key_pem()
        .unwrap_or_else(|e| panic!("key: {e}"));
    std::fs::write(&public, pubpem).unwrap_or_else(|e| panic!("{}: {e}", public.display()));
    (signer, private, public)
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct Publish<'a> {
    /// Update id.
    pub id: &'a str,
    /// Version.
    pub version: &'a str,
    /// Class.
    pub class: &'a str,
    /// Sequence.
    pub sequence: u64,
    /// Expiry from now, ms.
    pub expires_in_ms: u64,
    /// The image (component "rootfs").
    pub image: &'a Path,
    /// Chunk size.
    pub chunk_size: u32,
}

impl<'a> Publish<'a> {
    /// Version 1.1 of `test-class`, sequence 11, 16 KiB chunks, valid a day.
    pub fn new(id: &'a str, image: &'a Path) -> Self {
        Publish {
            id,
            version: "1.1.0",
            class: "test-class",
            sequence: 11,
            expires_in_ms: 86_400_000,
            image,
            chunk_size: 16 * 1024,
        }
    }

    /// The update spec.
    pub fn spec(&self) -> UpdateSpec {
        UpdateSpec {
            update_id: self.id.into(),
            version: self.version.into(),
            device_class: self.class.into(),
            sequence: self.sequence,
            chunk_size: self.chunk_size,
            expires_at_ms: fleet_proto::time::now_ms() + self.expires_in_ms,
            description: "test update".into(),
            images: vec![ImageSpec {
                component: "rootfs".into(),
                path: self.image.to_owned(),
            }],
        }
    }

    /// Builds, signs with `signer`, registers and uploads; the update's record afterwards.
    pub async fn try_run(
        &self,
        fleet: &FleetClient,
        signer: &UpdateSigner,
    ) -> Result<UpdateRecord, Box<dyn std::error::Error + Send + Sync>> {
        let built = build_update(&self.spec(), signer)?;
        let rec = fleet.create_update(built.signed.clone()).await?;
        fleet.upload_images(&built, &rec.images, |_, _| {}).await?;
        Ok(fleet.get_update(self.id).await?)
    }

    /// [`Publish::try_run`] for tests: panics on failure.
    pub async fn run(&self, fleet: &FleetClient, signer: &UpdateSigner) -> UpdateRecord {
        self.try_run(fleet, signer)
            .await
            .unwrap_or_else(|e| panic!("publishing {}: {e}", self.id))
    }
}
