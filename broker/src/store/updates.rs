//! Updates, their campaigns and each target device's progress.
//!
//! The signed manifest is kept exactly as received (devices verify those bytes). A campaign and
//! its targets are saved together in one transaction whenever the update service changes them,
//! so a restart continues from the last decision taken.

use fleet_proto::v1::{CampaignRecord, TargetRecord};
use fleet_proto::Message;
use rusqlite::{params, OptionalExtension};

use super::{err, from_sql, to_sql, Store, StoreError};

/// An update as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredUpdate {
    /// Its id.
    pub update_id: String,
    /// The encoded SignedManifest.
    pub signed_manifest: Vec<u8>,
    /// The service that registered it.
    pub created_by: String,
    /// When.
    pub created_at_ms: u64,
}

/// What registering an update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpdatePut {
    /// Newly registered.
    New,
    /// The same bytes were already registered.
    Same,
    /// Other bytes under the same id replaced the old ones (not deployed yet).
    Replaced,
    /// Other bytes under the id of a deployed update: refused.
    Conflict,
}

fn decode<M: Message + Default>(bytes: &[u8], col: usize) -> rusqlite::Result<M> {
    M::decode(bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Blob, Box::new(e))
    })
}

impl Store {
    /// Registers an update's signed manifest.
    pub(crate) fn put_update(&mut self, u: &StoredUpdate) -> Result<UpdatePut, StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        let old: Option<Vec<u8>> = tx
            .query_row(
                "SELECT signed_manifest FROM updates WHERE update_id = ?1",
                [&u.update_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| err(&path, e))?;
        let outcome = match old {
            Some(bytes) if bytes == u.signed_manifest => UpdatePut::Same,
            Some(_) => {
                let deployed: i64 = tx
                    .query_row(
                        "SELECT count(*) FROM campaigns WHERE update_id = ?1",
                        [&u.update_id],
                        |r| r.get(0),
                    )
                    .map_err(|e| err(&path, e))?;
                if deployed > 0 {
                    UpdatePut::Conflict
                } else {
                    tx.execute(
                        "UPDATE updates SET signed_manifest = ?2, created_by = ?3, created_at_ms = ?4
                         WHERE update_id = ?1",
                        params![u.update_id, u.signed_manifest, u.created_by, to_sql(u.created_at_ms)],
                    )
                    .map_err(|e| err(&path, e))?;
                    UpdatePut::Replaced
                }
            }
            None => {
                tx.execute(
                    "INSERT INTO updates (update_id, signed_manifest, created_by, created_at_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        u.update_id,
                        u.signed_manifest,
                        u.created_by,
                        to_sql(u.created_at_ms)
                    ],
                )
                .map_err(|e| err(&path, e))?;
                UpdatePut::New
            }
        };
        tx.commit().map_err(|e| err(&path, e))?;
        Ok(outcome)
    }

    /// The update `update_id`, if registered.
    pub(crate) fn update(&self, update_id: &str) -> Result<Option<StoredUpdate>, StoreError> {
        self.conn
            .query_row(
                "SELECT update_id, signed_manifest, created_by, created_at_ms
                 FROM updates WHERE update_id = ?1",
                [update_id],
                |r| {
                    Ok(StoredUpdate {
                        update_id: r.get(0)?,
                        signed_manifest: r.get(1)?,
                        created_by: r.get(2)?,
                        created_at_ms: from_sql(r.get(3)?),
                    })
                },
            )
            .optional()
            .map_err(|e| err(&self.path, e))
    }

    /// Creates a campaign with its targets (in rollout order). False, and nothing written,
    /// when the update already has one.
    pub(crate) fn create_campaign(
        &mut self,
        update_id: &str,
        campaign: &CampaignRecord,
        targets: &[TargetRecord],
    ) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        let n = tx
            .execute(
                "INSERT INTO campaigns (update_id, state, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
                params![update_id, campaign.state, campaign.encode_to_vec()],
            )
            .map_err(|e| err(&path, e))?;
        if n == 0 {
            return Ok(false);
        }
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO update_targets (update_id, device_id, position, record)
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(|e| err(&path, e))?;
            for (i, t) in targets.iter().enumerate() {
                stmt.execute(params![update_id, t.device_id, i as i64, t.encode_to_vec()])
                    .map_err(|e| err(&path, e))?;
            }
        }
        tx.commit().map_err(|e| err(&path, e))?;
        Ok(true)
    }

    /// Adds targets (each with its position in rollout order) to a campaign and saves its
    /// record, in one transaction.
    pub(crate) fn add_campaign_targets(
        &mut self,
        update_id: &str,
        campaign: &CampaignRecord,
        targets: &[(usize, TargetRecord)],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        tx.execute(
            "UPDATE campaigns SET state = ?2, record = ?3 WHERE update_id = ?1",
            params![update_id, campaign.state, campaign.encode_to_vec()],
        )
        .map_err(|e| err(&path, e))?;
        {
            let mut stmt = tx
                .prepare(
                    "INSERT INTO update_targets (update_id, device_id, position, record)
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(|e| err(&path, e))?;
            for (i, t) in targets {
                stmt.execute(params![
                    update_id,
                    t.device_id,
                    *i as i64,
                    t.encode_to_vec()
                ])
                .map_err(|e| err(&path, e))?;
            }
        }
        tx.commit().map_err(|e| err(&path, e))
    }

    /// Saves a campaign's record and the given targets' records in one transaction.
    pub(crate) fn save_campaign(
        &mut self,
        update_id: &str,
        campaign: &CampaignRecord,
        targets: &[&TargetRecord],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        tx.execute(
            "UPDATE campaigns SET state = ?2, record = ?3 WHERE update_id = ?1",
            params![update_id, campaign.state, campaign.encode_to_vec()],
        )
        .map_err(|e| err(&path, e))?;
        {
            let mut stmt = tx
                .prepare(
                    "UPDATE update_targets SET record = ?3 WHERE update_id = ?1 AND device_id = ?2",
                )
                .map_err(|e| err(&path, e))?;
            for t in targets {
                stmt.execute(params![update_id, t.device_id, t.encode_to_vec()])
                    .map_err(|e| err(&path, e))?;
            }
        }
        tx.commit().map_err(|e| err(&path, e))
    }

    /// Every campaign with its targets (in rollout order).
    pub(crate) fn campaigns(
        &self,
    ) -> Result<Vec<(String, CampaignRecord, Vec<TargetRecord>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT update_id, record FROM campaigns ORDER BY update_id")
            .map_err(|e| err(&self.path, e))?;
        let campaigns = stmt
            .query_map([], |r| {
                let record: Vec<u8> = r.get(1)?;
                Ok((
                    r.get::<_, String>(0)?,
                    decode::<CampaignRecord>(&record, 1)?,
                ))
            })
            .map_err(|e| err(&self.path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(&self.path, e))?;
        let mut targets = self
            .conn
            .prepare("SELECT record FROM update_targets WHERE update_id = ?1 ORDER BY position")
            .map_err(|e| err(&self.path, e))?;
        let mut out = Vec::with_capacity(campaigns.len());
        for (id, c) in campaigns {
            let t = targets
                .query_map([&id], |r| {
                    let record: Vec<u8> = r.get(0)?;
                    decode::<TargetRecord>(&record, 0)
                })
                .map_err(|e| err(&self.path, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| err(&self.path, e))?;
            out.push((id, c, t));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fleet_proto::v1::CampaignState;

    fn update(bytes: &[u8]) -> StoredUpdate {
        StoredUpdate {
            update_id: "fw-1.1".into(),
            signed_manifest: bytes.to_vec(),
            created_by: "svc-1".into(),
            created_at_ms: 5,
        }
    }

    #[test]
    fn updates_register_once_and_campaigns_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        assert_eq!(s.put_update(&update(b"a")).unwrap(), UpdatePut::New);
        assert_eq!(s.put_update(&update(b"a")).unwrap(), UpdatePut::Same);
        assert_eq!(s.put_update(&update(b"b")).unwrap(), UpdatePut::Replaced);
        assert_eq!(s.update("fw-1.1").unwrap().unwrap().signed_manifest, b"b");
        let mut c = CampaignRecord {
            state: CampaignState::Running.into(),
            batch_size: 1,
            ..Default::default()
        };
        let targets: Vec<TargetRecord> = ["d1", "d2"]
            .iter()
            .enumerate()
            .map(|(i, d)| TargetRecord {
                device_id: (*d).into(),
                batch: i as u32,
                ..Default::default()
            })
            .collect();
        assert!(s.create_campaign("fw-1.1", &c, &targets).unwrap());
        assert!(!s.create_campaign("fw-1.1", &c, &targets).unwrap());
        // Deployed: other bytes are refused.
        assert_eq!(s.put_update(&update(b"c")).unwrap(), UpdatePut::Conflict);
        c.state = CampaignState::Paused.into();
        let mut t2 = targets[1].clone();
        t2.offered = true;
        s.save_campaign("fw-1.1", &c, &[&t2]).unwrap();
        let all = s.campaigns().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, c);
        assert_eq!(all[0].2, vec![targets[0].clone(), t2]);
    }
}
