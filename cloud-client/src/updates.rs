//! The update authority's side: build and sign a manifest from image files (streamed: SHA-256,
//! chunk digests, Merkle root), register it on a gateway, upload the images chunk by chunk with
//! proofs (resuming from what the gateway holds), deploy and steer campaigns.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use fleet_proto::chunker::{self, summarize, ImageSummary};
use fleet_proto::merkle::MerkleTree;
use fleet_proto::signing::UpdateSigner;
use fleet_proto::v1::{
    api_request, api_response, CampaignAction, ControlCampaign, CreateUpdate, DeployUpdate,
    GetUpdate, ImageState, SignedManifest, UpdateManifest, UpdateRecord, UploadChunk,
};
use tokio::task::JoinSet;

use crate::client::{FleetClient, SdkError};
use crate::signed::signed_withdrawal;

/// Requests in flight while uploading.
const UPLOAD_WINDOW: usize = 8;

/// One image of an update to build.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Component name (e.g. "rootfs").
    pub component: String,
    /// The image file.
    pub path: PathBuf,
}

/// What an update is, before it is signed.
#[derive(Debug, Clone)]
pub struct UpdateSpec {
    /// Update id.
    pub update_id: String,
    /// Version after the update.
    pub version: String,
    /// Device class it is for.
    pub device_class: String,
    /// Anti-rollback sequence (greater than anything installed).
    pub sequence: u64,
    /// Chunk size in bytes (1 KiB to 1 MiB).
    pub chunk_size: u32,
    /// Expiry, Unix epoch ms.
    pub expires_at_ms: u64,
    /// Release notes summary.
    pub description: String,
    /// The images, installed all or nothing.
    pub images: Vec<ImageSpec>,
}

/// A built update: the signed manifest and what uploading needs.
#[derive(Debug, Clone)]
pub struct BuiltUpdate {
    /// The signed manifest.
    pub signed: SignedManifest,
    /// The manifest inside it.
    pub manifest: UpdateManifest,
    /// Each image with its chunk digests, in manifest order.
    pub images: Vec<(ImageSpec, ImageSummary)>,
}

/// Why an update cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// An image file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An image cannot be chunked as asked (empty, chunk size out of range, too many chunks).
    #[error("{path}: {source}")]
    Chunk {
        /// The file.
        path: PathBuf,
        /// The error.
        source: chunker::ChunkError,
    },
    /// The manifest would be invalid.
    #[error("manifest: {0}")]
    Manifest(String),
}

/// Builds and signs an update. Images are read once, streamed; memory holds 32 bytes per chunk.
pub fn build_update(spec: &UpdateSpec, signer: &UpdateSigner) -> Result<BuiltUpdate, BuildError> {
    let mut images = Vec::with_capacity(spec.images.len());
    let mut components = Vec::with_capacity(spec.images.len());
    for img in &spec.images {
        let f = File::open(&img.path).map_err(|source| BuildError::Io {
            path: img.path.clone(),
            source,
        })?;
        let summary =
            summarize(BufReader::new(f), spec.chunk_size).map_err(|source| BuildError::Chunk {
                path: img.path.clone(),
                source,
            })?;
        components.push(summary.component(&img.component));
        images.push((img.clone(), summary));
    }
    let manifest = UpdateManifest {
        format_version: fleet_proto::manifest::FORMAT_VERSION,
        update_id: spec.update_id.clone(),
        device_class: spec.device_class.clone(),
        version: spec.version.clone(),
        sequence: spec.sequence,
        issued_at_ms: fleet_proto::time::now_ms(),
        expires_at_ms: spec.expires_at_ms,
        components,
        description: spec.description.clone(),
    };
    fleet_proto::manifest::validate(&manifest).map_err(|e| BuildError::Manifest(e.to_string()))?;
    let signed = signer.sign_manifest(&manifest);
    Ok(BuiltUpdate {
        signed,
        manifest,
        images,
    })
}

/// Reads chunk `index` of an image file.
fn read_chunk(path: &Path, summary: &ImageSummary, index: u32) -> std::io::Result<Vec<u8>> {
    let (offset, len) =
        chunker::chunk_span(index, summary.size, summary.chunk_size).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "chunk out of range")
        })?;
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

fn bit(held: &[u8], i: u32) -> bool {
    held.get(i as usize / 8)
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}

impl FleetClient {
    async fn update_call(&self, body: api_request::Body) -> Result<UpdateRecord, SdkError> {
        match self.request(body).await? {
            api_response::Body::Update(r) => Ok(r),
            other => Err(SdkError::Protocol(format!("{other:?}"))),
        }
    }

    /// Registers a signed update on the gateway; the answer says which chunks it already holds.
    pub async fn create_update(&self, signed: SignedManifest) -> Result<UpdateRecord, SdkError> {
        self.update_call(api_request::Body::CreateUpdate(CreateUpdate {
            manifest: Some(signed),
        }))
        .await
    }

    /// Uploads what the gateway lacks of each image (`state` from [`FleetClient::create_update`]
    /// or [`FleetClient::get_update`]), a window of chunks at a time. `progress(sent, total)`
    /// is called after every chunk. Returns the number of chunks sent.
    pub async fn upload_images(
        &self,
        built: &BuiltUpdate,
        state: &[ImageState],
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, SdkError> {
        let mut todo = Vec::new();
        for (i, (spec, summary)) in built.images.iter().enumerate() {
            let st = state.iter().find(|s| s.component == spec.component);
            if st.is_some_and(|s| s.complete) {
                continue;
            }
            let held = st.map(|s| s.held.clone()).unwrap_or_default();
            for idx in 0..summary.chunk_count() {
                if !bit(&held, idx) {
                    todo.push((i, idx));
                }
            }
        }
        let total = todo.len() as u64;
        let trees: Vec<MerkleTree> = built
            .images
            .iter()
            .map(|(_, s)| MerkleTree::from_chunk_digests(&s.chunk_digests))
            .collect::<Result<_, _>>()
            .map_err(|e| SdkError::Config(format!("image tree: {e}")))?;
        let mut set: JoinSet<Result<(), SdkError>> = JoinSet::new();
        let mut sent = 0u64;
        let mut next = todo.into_iter();
        loop {
            while set.len() < UPLOAD_WINDOW {
                let Some((i, idx)) = next.next() else { break };
                let (spec, summary) = &built.images[i];
                let data = read_chunk(&spec.path, summary, idx)
                    .map_err(|e| SdkError::Config(format!("{}: {e}", spec.path.display())))?;
                let proof = trees[i]
                    .proof(idx)
                    .map_err(|e| SdkError::Config(format!("proof of chunk {idx}: {e}")))?;
                let req = UploadChunk {
                    update_id: built.manifest.update_id.clone(),
                    component: spec.component.clone(),
                    index: idx,
                    data,
                    proof: proof.iter().map(|h| h.to_vec()).collect(),
                };
                let client = self.clone();
                set.spawn(async move {
                    match client.request(api_request::Body::UploadChunk(req)).await? {
                        api_response::Body::UploadChunk(_) => Ok(()),
                        other => Err(SdkError::Protocol(format!("{other:?}"))),
                    }
                });
            }
            let Some(done) = set.join_next().await else {
                break;
            };
            done.map_err(|e| SdkError::Protocol(format!("upload task: {e}")))??;
            sent += 1;
            progress(sent, total);
        }
        Ok(sent)
    }

    /// Reads an update: images, campaign, per-device progress.
    pub async fn get_update(&self, update_id: &str) -> Result<UpdateRecord, SdkError> {
        self.update_call(api_request::Body::GetUpdate(GetUpdate {
            update_id: update_id.to_owned(),
        }))
        .await
    }

    /// Starts the rollout of an update.
    pub async fn deploy_update(&self, req: DeployUpdate) -> Result<UpdateRecord, SdkError> {
        self.update_call(api_request::Body::DeployUpdate(req)).await
    }

    /// Pauses, resumes or aborts an update's campaign. An abort is
    /// [`abort_update`](Self::abort_update) with a reason naming this service.
    pub async fn control_campaign(
        &self,
        update_id: &str,
        action: CampaignAction,
    ) -> Result<UpdateRecord, SdkError> {
        if action == CampaignAction::Abort {
            let reason = format!("aborted by {}", self.service_id());
            return self.abort_update(update_id, &reason).await;
        }
        self.update_call(api_request::Body::ControlCampaign(ControlCampaign {
            withdrawal: None,
            update_id: update_id.to_owned(),
            action: action.into(),
        }))
        .await
    }

    /// Aborts an update's campaign with a signed withdrawal of its offer: reads the digest of
    /// the manifest the gateway holds (`UpdateRecord.manifest_sha256`), signs a withdrawal of
    /// exactly that manifest with the `commands` key(s) ([`SdkError::NoCommandKey`] without
    /// one), and hands it to the gateway, which publishes it in place of the manifest. Devices
    /// drop their staging only on such an authority-signed withdrawal.
    pub async fn abort_update(
        &self,
        update_id: &str,
        reason: &str,
    ) -> Result<UpdateRecord, SdkError> {
        if self.signers().is_empty() {
            return Err(SdkError::NoCommandKey);
        }
        let record = self.get_update(update_id).await?;
        let withdrawal = signed_withdrawal(
            update_id,
            &record.manifest_sha256,
            reason,
            self.signers(),
            fleet_proto::time::now_ms(),
        )?;
        self.update_call(api_request::Body::ControlCampaign(ControlCampaign {
            withdrawal: Some(withdrawal),
            update_id: update_id.to_owned(),
            action: CampaignAction::Abort.into(),
        }))
        .await
    }
}
