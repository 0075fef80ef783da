//! The update requests of the fleet API: register an update, upload its images chunk by chunk,
//! read it, deploy it, steer its campaign.

use fleet_proto::ids::validate_id;
use fleet_proto::v1::{
    api_request, api_response, ApiError, ApiErrorCode, CampaignAction, CampaignState,
    ControlCampaign, CreateUpdate, DeployUpdate, GetUpdate, ImageState, TargetRecord, UpdateRecord,
    UploadChunk, UploadChunkResponse,
};
use fleet_proto::Message;
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::campaign::{wrong_class, Campaign};
use super::limits::{self, Refusal};
use super::{decode_signed, ApiCall, UpdateService};
use crate::firmware::{Accepted, FirmwareError};
use crate::metrics::Metrics;
use crate::services::api::{api_error, response};
use crate::store::{ImageRow, StoredUpdate, UpdatePut};

/// Most target devices in one deployment.
pub(super) const MAX_TARGETS: usize = 10_000;

fn invalid(m: impl Into<String>) -> ApiError {
    api_error(ApiErrorCode::Invalid, m)
}

fn unavailable() -> ApiError {
    api_error(
        ApiErrorCode::Unavailable,
        "the gateway's store failed; see its log",
    )
}

fn not_found(update_id: &str) -> ApiError {
    api_error(
        ApiErrorCode::NotFound,
        format!("no update {update_id:?}; register it with CreateUpdate first"),
    )
}

/// The upload state of each component of a registered manifest.
fn image_states(
    s: &mut crate::store::Store,
    m: &fleet_proto::v1::UpdateManifest,
) -> Result<Vec<ImageState>, crate::store::StoreError> {
    let mut out = Vec::with_capacity(m.components.len());
    for c in &m.components {
        let hex = hex::encode(&c.sha256);
        let row = s.image(&hex)?;
        let complete = row.as_ref().is_some_and(|r| r.complete);
        let (held, count) = if complete {
            (Vec::new(), c.chunk_count)
        } else {
            let mut bits = vec![0u8; c.chunk_count.div_ceil(8) as usize];
            let mut n = 0;
            for (i, _) in s.image_chunks(&hex)? {
                if let Some(b) = bits.get_mut(i as usize / 8) {
                    *b |= 1 << (i % 8);
                    n += 1;
                }
            }
            (bits, n)
        };
        out.push(ImageState {
            component: c.name.clone(),
            chunk_count: c.chunk_count,
            chunks_held: count,
            complete,
            held,
        });
    }
    Ok(out)
}

impl UpdateService {
    pub(super) async fn on_call(&mut self, call: ApiCall) {
        let ApiCall {
            service,
            request_id,
            body,
        } = call;
        let answer = match body {
            api_request::Body::CreateUpdate(req) => self
                .create_update(&service, req)
                .await
                .map(api_response::Body::Update),
            api_request::Body::UploadChunk(req) => self
                .upload_chunk(&service, req)
                .await
                .map(api_response::Body::UploadChunk),
            api_request::Body::GetUpdate(GetUpdate { update_id }) => self
                .record(&update_id)
                .await
                .map(api_response::Body::Update),
            api_request::Body::DeployUpdate(req) => self
                .deploy(&service, req)
                .await
                .map(api_response::Body::Update),
            api_request::Body::ControlCampaign(req) => self
                .control(&service, req)
                .await
                .map(api_response::Body::Update),
            _ => Err(invalid("not an update request")),
        };
        let body = answer.unwrap_or_else(api_response::Body::Error);
        let (topic, bytes) = response(&service, request_id, body);
        if let Err(e) = self.link.publish(topic, bytes) {
            warn!(service, error = %e, "could not publish an API response");
        }
    }

    async fn create_update(
        &mut self,
        service: &str,
        req: CreateUpdate,
    ) -> Result<UpdateRecord, ApiError> {
        let signed = req
            .manifest
            .ok_or_else(|| invalid("CreateUpdate needs a signed manifest"))?;
        let bytes = signed.encode_to_vec();
        let (signed, m) = decode_signed(&bytes).map_err(invalid)?;
        // Every field is bounded before anything is stored or allocated for it.
        limits::check_create(&signed, &m, self.settings.max_update_bytes)
            .map_err(|e| self.refuse(service, "CreateUpdate", e))?;
        let now = fleet_proto::time::now_ms();
        if m.expires_at_ms <= now {
            return Err(invalid(format!(
                "the manifest expired at {} ms (now {now} ms); sign a new one",
                m.expires_at_ms
            )));
        }
        let update_id = m.update_id.clone();
        let row = StoredUpdate {
            update_id: update_id.clone(),
            signed_manifest: bytes,
            created_by: service.to_owned(),
            created_at_ms: now,
        };
        let components = m.components.clone();
        let put = self
            .store
            .call("register update", move |s| {
                // Every image must be new or chunked the same way as before.
                for c in &components {
                    let image = s.put_image(&ImageRow::of(c), now)?;
                    if !image.matches(c) {
                        return Ok(Err(image.sha256));
                    }
                }
                s.put_update(&row).map(Ok)
            })
            .await
            .map_err(|_| unavailable())?
            .map_err(|sha| {
                api_error(
                    ApiErrorCode::Conflict,
                    format!("image {sha} is already in the cache with another chunk size or Merkle root"),
                )
            })?;
        match put {
            UpdatePut::Conflict => {
                return Err(api_error(
                    ApiErrorCode::Conflict,
                    format!("update {update_id:?} is deployed with a different manifest; use a new update id"),
                ))
            }
            UpdatePut::New | UpdatePut::Replaced => {
                self.served.remove(&update_id);
                info!(service, update_id = %update_id, version = %m.version, class = %m.device_class, sequence = m.sequence, components = m.components.len(), replaced = put == UpdatePut::Replaced, "update registered");
            }
            UpdatePut::Same => {}
        }
        self.record(&update_id).await
    }

    async fn upload_chunk(
        &mut self,
        service: &str,
        mut req: UploadChunk,
    ) -> Result<UploadChunkResponse, ApiError> {
        limits::check_upload(&req).map_err(|e| self.refuse(service, "UploadChunk", e))?;
        let id = req.update_id.clone();
        let stored = self
            .store
            .call("get update", move |s| s.update(&id))
            .await
            .map_err(|_| unavailable())?
            .ok_or_else(|| not_found(&req.update_id))?;
        let (_, m) = decode_signed(&stored.signed_manifest).map_err(invalid)?;
        let c = m
            .components
            .iter()
            .find(|c| c.name == req.component)
            .cloned()
            .ok_or_else(|| invalid(format!("update has no component {:?}", req.component)))?;
        let now = fleet_proto::time::now_ms();
        let (name, index) = (c.name.clone(), req.index);
        // The file work runs outside the store's lock; only its records take it.
        let data = std::mem::take(&mut req.data);
        let accepted = self
            .firmware
            .accept_chunk(&self.store, &c, index, data, &req.proof, now)
            .await;
        match accepted {
            Ok(a) => {
                let hex = hex::encode(&c.sha256);
                let count = c.chunk_count;
                let (chunks_held, complete) = self
                    .store
                    .call("upload chunk state", move |s| {
                        if s.image(&hex)?.is_some_and(|i| i.complete) {
                            return Ok((count, true));
                        }
                        Ok((s.image_chunk_held(&hex, 0)?.1, false))
                    })
                    .await
                    .map_err(|_| unavailable())?;
                if a != Accepted::Duplicate {
                    Metrics::inc(&self.metrics.chunks_uploaded);
                }
                if a == Accepted::Complete {
                    self.served.remove(&req.update_id);
                    info!(update_id = %req.update_id, component = %name, "image complete and checked");
                }
                Ok(UploadChunkResponse {
                    component: name,
                    chunks_held,
                    complete,
                })
            }
            Err(FirmwareError::Chunk(e)) => Err(invalid(format!("chunk {index}: {e}"))),
            Err(FirmwareError::DigestMismatch(sha)) => Err(invalid(format!(
                "every chunk matched its proof but the whole image {sha} did not: the manifest is inconsistent; its chunks were dropped"
            ))),
            Err(FirmwareError::Mismatch(sha)) => Err(api_error(
                ApiErrorCode::Conflict,
                format!("image {sha} is already in the cache with another chunking"),
            )),
            Err(e) => {
                warn!(update_id = %req.update_id, error = %e, "firmware cache write failed");
                Err(api_error(ApiErrorCode::Unavailable, format!("firmware cache: {e}")))
            }
        }
    }

    /// Counts a request refused by a bound, logs it within the budget, and says why.
    fn refuse(&self, service: &str, call: &str, e: Refusal) -> ApiError {
        self.refused(service, &format!("{call} refused: {e}"));
        let code = match e {
            Refusal::TooLarge { .. } => ApiErrorCode::Limit,
            _ => ApiErrorCode::Invalid,
        };
        api_error(code, e.to_string())
    }

    /// The full record of an update: images, campaign, targets.
    pub(super) async fn record(&mut self, update_id: &str) -> Result<UpdateRecord, ApiError> {
        validate_id(update_id).map_err(|e| invalid(format!("update_id: {e}")))?;
        let id = update_id.to_owned();
        let (stored, m, images) = self
            .store
            .call("get update", move |s| {
                let Some(u) = s.update(&id)? else {
                    return Ok(None);
                };
                let m = decode_signed(&u.signed_manifest)
                    .map(|(signed, m)| (Sha256::digest(&signed.manifest).to_vec(), m));
                let images = match &m {
                    Ok((_, m)) => image_states(s, m)?,
                    Err(_) => Vec::new(),
                };
                Ok(Some((u, m, images)))
            })
            .await
            .map_err(|_| unavailable())?
            .ok_or_else(|| not_found(update_id))?;
        let (manifest_sha256, m) = m.map_err(invalid)?;
        let campaign = self.campaigns.get(update_id);
        Ok(UpdateRecord {
            manifest_sha256,
            update_id: m.update_id,
            version: m.version,
            device_class: m.device_class,
            sequence: m.sequence,
            expires_at_ms: m.expires_at_ms,
            created_at_ms: stored.created_at_ms,
            created_by: stored.created_by,
            images,
            campaign: campaign.map(|c| c.record.clone()),
            targets: campaign.map(|c| c.targets.clone()).unwrap_or_default(),
        })
    }

    async fn deploy(&mut self, service: &str, req: DeployUpdate) -> Result<UpdateRecord, ApiError> {
        let record = self.record(&req.update_id).await?;
        if let Some(i) = record.images.iter().find(|i| !i.complete) {
            return Err(invalid(format!(
                "image of component {:?} is not complete on the gateway ({} of {} chunks); finish the upload first",
                i.component, i.chunks_held, i.chunk_count
            )));
        }
        if req.add_targets && self.campaigns.contains_key(&req.update_id) {
            return self.add_targets(req, &record).await;
        }
        if self.campaigns.contains_key(&req.update_id) {
            return Err(api_error(
                ApiErrorCode::Conflict,
                format!(
                    "update {:?} is already deployed; see its campaign",
                    req.update_id
                ),
            ));
        }
        if req.max_failures_percent > 100 {
            return Err(invalid("max_failures_percent must be 0 to 100"));
        }
        let mut devices = Vec::new();
        for d in &req.device_ids {
            validate_id(d).map_err(|e| invalid(format!("device id {d:?}: {e}")))?;
            devices.push(d.clone());
        }
        if !req.device_class.is_empty() && req.device_class != record.device_class {
            return Err(invalid(format!(
                "the update is for class {:?}, not {:?}: devices refuse a manifest of another class",
                record.device_class, req.device_class
            )));
        }
        let class = if req.device_class.is_empty() && devices.is_empty() {
            record.device_class.clone()
        } else {
            req.device_class.clone()
        };
        if !class.is_empty() {
            let c = class.clone();
            let mut members = self
                .store
                .call("devices of class", move |s| s.devices_of_class(&c))
                .await
                .map_err(|_| unavailable())?;
            members.sort();
            devices.extend(members);
        }
        if devices.is_empty() {
            return Err(api_error(
                ApiErrorCode::NotFound,
                format!("no target: no device given and no known device of class {class:?}"),
            ));
        }
        if devices.len() > MAX_TARGETS {
            return Err(invalid(format!("more than {MAX_TARGETS} targets")));
        }
        // Every target the gateway knows the class of must be of the manifest's class.
        self.check_targets(&record, devices.clone()).await?;
        let now = fleet_proto::time::now_ms();
        let mut c = Campaign::plan(
            &devices,
            req.batch_size,
            req.max_failures_percent,
            service,
            now,
        );
        let (id, rec, targets) = (req.update_id.clone(), c.record.clone(), c.targets.clone());
        let created = self
            .store
            .call("create campaign", move |s| {
                s.create_campaign(&id, &rec, &targets)
            })
            .await
            .map_err(|_| unavailable())?;
        if !created {
            return Err(api_error(ApiErrorCode::Conflict, "already deployed"));
        }
        info!(service, update_id = %req.update_id, devices = c.targets.len(), batch_size = c.record.batch_size, max_failures_percent = c.record.max_failures_percent, "campaign deployed");
        let effects = c.start(now);
        self.campaigns.insert(req.update_id.clone(), c);
        self.apply(&req.update_id, effects).await;
        self.record(&req.update_id).await
    }

    /// Refuses targets the gateway knows to be of another class than the manifest's, and a
    /// manifest that has expired.
    async fn check_targets(
        &self,
        record: &UpdateRecord,
        mut ids: Vec<String>,
    ) -> Result<(), ApiError> {
        ids.sort();
        ids.dedup();
        let known = self
            .store
            .call("classes of targets", move |s| {
                ids.into_iter()
                    .map(|d| {
                        let class = s.device_state(&d)?.and_then(|st| st.device_class);
                        Ok((d, class))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(|_| unavailable())?;
        if let Some(why) = wrong_class(&record.device_class, &known) {
            return Err(invalid(why));
        }
        if record.expires_at_ms <= fleet_proto::time::now_ms() {
            return Err(invalid("the manifest has expired; sign a new one"));
        }
        Ok(())
    }

    /// DeployUpdate with `add_targets` on an update that has a campaign: the new devices
    /// become one batch at its end (see `Campaign::add_batch`), stored before any offer.
    async fn add_targets(
        &mut self,
        req: DeployUpdate,
        record: &UpdateRecord,
    ) -> Result<UpdateRecord, ApiError> {
        let threshold = self
            .campaigns
            .get(&req.update_id)
            .map(|c| c.record.max_failures_percent);
        let same_threshold =
            req.max_failures_percent == 0 || Some(req.max_failures_percent) == threshold;
        if req.batch_size != 0 || !same_threshold || !req.device_class.is_empty() {
            return Err(invalid(
                "add_targets takes device_ids only: the campaign keeps its batch size, threshold and class",
            ));
        }
        for d in &req.device_ids {
            validate_id(d).map_err(|e| invalid(format!("device id {d:?}: {e}")))?;
        }
        self.check_targets(record, req.device_ids.clone()).await?;
        let Some(c) = self.campaigns.get_mut(&req.update_id) else {
            return Err(api_error(ApiErrorCode::NotFound, "no campaign"));
        };
        if c.targets.len() + req.device_ids.len() > MAX_TARGETS {
            return Err(invalid(format!("more than {MAX_TARGETS} targets")));
        }
        let before = (c.record.clone(), c.targets.clone());
        let now = fleet_proto::time::now_ms();
        let added = c
            .add_batch(&req.device_ids, now)
            .map_err(|e| api_error(ApiErrorCode::Conflict, e.0))?;
        let Some((positions, mut effects)) = added else {
            return self.record(&req.update_id).await;
        };
        let rec = c.record.clone();
        let batch = rec.batches.saturating_sub(1);
        let new: Vec<(usize, TargetRecord)> = positions
            .iter()
            .filter_map(|&i| c.targets.get(i).cloned().map(|t| (i, t)))
            .collect();
        let id = req.update_id.clone();
        let stored = self
            .store
            .call("add campaign targets", move |s| {
                s.add_campaign_targets(&id, &rec, &new)
            })
            .await;
        if stored.is_err() {
            // Nothing was written: forget the batch, as if the request had not come.
            let (record, targets) = before;
            self.campaigns
                .insert(req.update_id.clone(), Campaign::from_parts(record, targets));
            return Err(unavailable());
        }
        info!(update_id = %req.update_id, devices = positions.len(), batch, "targets added to the campaign");
        // The new targets (offered flags included) and the record are stored: only offer.
        effects.campaign_changed = false;
        effects.changed.clear();
        self.apply(&req.update_id, effects).await;
        self.record(&req.update_id).await
    }

    async fn control(
        &mut self,
        service: &str,
        req: ControlCampaign,
    ) -> Result<UpdateRecord, ApiError> {
        let action = req.action();
        let now = fleet_proto::time::now_ms();
        if !self.campaigns.contains_key(&req.update_id) {
            return Err(api_error(
                ApiErrorCode::NotFound,
                format!(
                    "update {:?} has no campaign; deploy it first",
                    req.update_id
                ),
            ));
        }
        let withdrawal = if action == CampaignAction::Abort {
            let record = self.record(&req.update_id).await?;
            Some(check_withdrawal(
                &req.update_id,
                &record.manifest_sha256,
                req.withdrawal.as_ref(),
            )?)
        } else {
            None
        };
        let c = self.campaigns.get_mut(&req.update_id).ok_or_else(|| {
            api_error(
                ApiErrorCode::NotFound,
                format!(
                    "update {:?} has no campaign; deploy it first",
                    req.update_id
                ),
            )
        })?;
        let mut effects = c
            .control(action, now)
            .map_err(|e| api_error(ApiErrorCode::Conflict, e.0))?;
        // An abort's targets get the signed withdrawal, not an empty message (a device drops
        // its staging only on an authority-signed withdrawal).
        let withdrawn = match &withdrawal {
            Some(_) => std::mem::take(&mut effects.withdraw),
            None => Vec::new(),
        };
        let state: CampaignState = c.record.state();
        info!(service, update_id = %req.update_id, ?action, ?state, "campaign control");
        if action == CampaignAction::Abort {
            for t in &c.targets {
                if t.aborted {
                    self.queue.remove(&t.device_id);
                }
            }
        }
        if !self.apply(&req.update_id, effects).await {
            return Err(unavailable());
        }
        if let Some(bytes) = withdrawal {
            for d in &withdrawn {
                self.publish_withdrawal(d, bytes.clone()).await;
            }
            self.withdrawals.insert(req.update_id.clone(), bytes);
        }
        self.record(&req.update_id).await
    }
}

/// Checks the withdrawal an abort must carry and returns the bytes to publish: a
/// SignedManifest with `manifest` empty and `withdrawal` set, 1 to `MAX_SIGNATURES`
/// signatures, the withdrawal (within its bound) decoding as an UpdateWithdrawal for
/// `update_id` that names the stored manifest (`manifest_sha256`). Its signatures are the
/// devices' business.
pub(super) fn check_withdrawal(
    update_id: &str,
    manifest_sha256: &[u8],
    w: Option<&fleet_proto::v1::SignedManifest>,
) -> Result<Vec<u8>, ApiError> {
    let Some(w) = w else {
        return Err(invalid(
            "an abort needs `withdrawal`: an UpdateWithdrawal signed by the commands role",
        ));
    };
    if !w.manifest.is_empty() || w.withdrawal.is_empty() {
        return Err(invalid(
            "withdrawal: a SignedManifest with `manifest` empty and `withdrawal` set",
        ));
    }
    if w.withdrawal.len() > fleet_proto::command::MAX_WITHDRAWAL_LEN {
        return Err(invalid(format!(
            "withdrawal: {} bytes; at most {}",
            w.withdrawal.len(),
            fleet_proto::command::MAX_WITHDRAWAL_LEN
        )));
    }
    if w.signatures.is_empty() || w.signatures.len() > fleet_proto::limits::MAX_SIGNATURES {
        return Err(invalid(format!(
            "withdrawal: {} signatures; 1 to {} are needed",
            w.signatures.len(),
            fleet_proto::limits::MAX_SIGNATURES
        )));
    }
    let body = fleet_proto::v1::UpdateWithdrawal::decode(w.withdrawal.as_slice())
        .map_err(|e| invalid(format!("withdrawal is not an UpdateWithdrawal: {e}")))?;
    if body.update_id != update_id {
        return Err(invalid(format!(
            "withdrawal names update {:?}, not {update_id:?}",
            body.update_id
        )));
    }
    if body.manifest_sha256 != manifest_sha256 {
        return Err(invalid(
            "withdrawal names another manifest (manifest_sha256 differs from the stored one)",
        ));
    }
    Ok(w.encode_to_vec())
}

#[cfg(test)]
mod withdrawal_tests {
    use super::*;
    use fleet_proto::command::{sign_withdrawal, withdrawal_of};
    use fleet_proto::signing::UpdateSigner;

    #[test]
    fn an_abort_needs_a_withdrawal_of_the_stored_manifest() {
        let key = UpdateSigner::generate();
        let manifest = b"the stored manifest bytes";
        let digest = Sha256::digest(manifest).to_vec();
        let w = sign_withdrawal(&withdrawal_of("u-1", manifest, 5, "bad batch"), &[&key])
            .unwrap_or_else(|e| panic!("{e}"));
        let bytes = check_withdrawal("u-1", &digest, Some(&w)).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(bytes, w.encode_to_vec(), "published as given");
        let refused = |w: Option<&fleet_proto::v1::SignedManifest>, update: &str| {
            check_withdrawal(update, &digest, w)
                .map(|_| ())
                .map_err(|e| e.code())
        };
        assert_eq!(refused(None, "u-1"), Err(ApiErrorCode::Invalid));
        assert_eq!(refused(Some(&w), "u-2"), Err(ApiErrorCode::Invalid));
        let other = sign_withdrawal(&withdrawal_of("u-1", b"another", 5, ""), &[&key])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(refused(Some(&other), "u-1"), Err(ApiErrorCode::Invalid));
        let mut unsigned = w.clone();
        unsigned.signatures.clear();
        assert_eq!(refused(Some(&unsigned), "u-1"), Err(ApiErrorCode::Invalid));
        let mut with_manifest = w.clone();
        with_manifest.manifest = manifest.to_vec();
        assert_eq!(
            refused(Some(&with_manifest), "u-1"),
            Err(ApiErrorCode::Invalid)
        );
        let mut too_many = w.clone();
        too_many.signatures = vec![w.signatures[0].clone(); 9];
        assert_eq!(refused(Some(&too_many), "u-1"), Err(ApiErrorCode::Invalid));
    }
}
