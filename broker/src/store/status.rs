//! The status registry's table: the last StatusReport and Presence of each device.
//!
//! Reports carry a per-device sequence (`StatusReport.sequence`, persisted by the device). The
//! registry keeps a report only if its sequence is higher than the stored one, so a report
//! delivered twice (QoS 1 re-delivery, a device re-sending its outbox after a reconnect) or late
//! is recognised, counted by the caller and not stored twice.

use rusqlite::{params, OptionalExtension};

use super::{err, from_sql, to_sql, Store, StoreError, WriteTx};

/// What became of a report offered to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutcome {
    /// Newer than what was stored: it is now the device's last report.
    Stored,
    /// Not newer than the stored report (a duplicate or a late one): not stored.
    Stale {
        /// The sequence of the report kept.
        stored: u64,
    },
}

/// A device's last known state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The device.
    pub device_id: String,
    /// Sequence, bytes and storage time of its last report, if any.
    pub status: Option<(u64, Vec<u8>, u64)>,
    /// Bytes and storage time of its last presence message, if any.
    pub presence: Option<(Vec<u8>, u64)>,
    /// Its class, as last reported.
    pub device_class: Option<String>,
    /// Distinct reports stored (duplicates and late reports are not counted).
    pub reports_stored: u64,
    /// Bytes and storage time of its last trust report, if any.
    pub trust: Option<(Vec<u8>, u64)>,
}

/// One report for [`WriteTx::put_status`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatusWrite<'a> {
    /// The device (authenticated by the topic it published on).
    pub device_id: &'a str,
    /// `StatusReport.sequence`.
    pub sequence: u64,
    /// The report as received.
    pub report: &'a [u8],
    /// `StatusReport.device_class`, if set: remembered for class-wide commands.
    pub device_class: Option<&'a str>,
}

impl Store {
    /// Offers a report: stored (in one transaction) only if its sequence is newer.
    pub fn put_status(
        &mut self,
        device_id: &str,
        sequence: u64,
        report: &[u8],
        now_ms: u64,
    ) -> Result<StatusOutcome, StoreError> {
        let w = StatusWrite {
            device_id,
            sequence,
            report,
            device_class: None,
        };
        self.write(|tx| tx.put_status(&w, now_ms))
    }

    /// Remembers a device's class (from its presence), for class-wide commands.
    pub(crate) fn set_device_class(
        &mut self,
        device_id: &str,
        class: &str,
    ) -> Result<(), StoreError> {
        if class.is_empty() {
            return Ok(());
        }
        self.conn
            .execute(
                "INSERT INTO device_state (device_id, device_class) VALUES (?1, ?2)
                 ON CONFLICT (device_id) DO UPDATE SET device_class = excluded.device_class",
                params![device_id, class],
            )
            .map(|_| ())
            .map_err(|e| err(&self.path, e))
    }

    /// Every known device of a class, by id.
    pub(crate) fn devices_of_class(&self, class: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT device_id FROM device_state WHERE device_class = ?1 ORDER BY device_id",
            )
            .map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map([class], |r| r.get(0))
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| err(&self.path, e))
    }

    /// Records a device's presence message.
    pub fn put_presence(
        &mut self,
        device_id: &str,
        presence: &[u8],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO device_state (device_id, presence, presence_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (device_id) DO UPDATE SET
                   presence = excluded.presence, presence_at_ms = excluded.presence_at_ms",
                params![device_id, presence, to_sql(now_ms)],
            )
            .map(drop)
            .map_err(|e| err(&self.path, e))
    }

    /// The last known state of one device.
    pub fn device_state(&self, device_id: &str) -> Result<Option<DeviceState>, StoreError> {
        self.conn
            .query_row(
                "SELECT device_id, status_sequence, status, status_at_ms, presence, presence_at_ms,
                        device_class, reports_stored, trust, trust_at_ms
                 FROM device_state WHERE device_id = ?1",
                [device_id],
                row_to_state,
            )
            .optional()
            .map_err(|e| err(&self.path, e))
    }

    /// Number of devices with a stored state (the devices the gateway knows).
    pub(crate) fn device_count(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM device_state", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(|e| err(&self.path, e))
    }

    /// The last known state of every device, by id.
    pub fn device_states(&self) -> Result<Vec<DeviceState>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT device_id, status_sequence, status, status_at_ms, presence, presence_at_ms,
                        device_class, reports_stored, trust, trust_at_ms
                 FROM device_state ORDER BY device_id",
            )
            .map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map([], row_to_state)
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| err(&self.path, e))
    }
}

impl WriteTx<'_> {
    /// Offers a report inside a larger transaction: stored only if its sequence is newer than
    /// the stored one.
    pub(crate) fn put_status(
        &mut self,
        w: &StatusWrite<'_>,
        now_ms: u64,
    ) -> Result<StatusOutcome, StoreError> {
        let path = self.path;
        let stored: Option<Option<i64>> = self
            .tx
            .query_row(
                "SELECT status_sequence FROM device_state WHERE device_id = ?1",
                [w.device_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| err(path, e))?;
        if let Some(Some(seq)) = stored {
            if from_sql(seq) >= w.sequence {
                return Ok(StatusOutcome::Stale {
                    stored: from_sql(seq),
                });
            }
        }
        self.tx
            .execute(
                "INSERT INTO device_state
                   (device_id, status_sequence, status, status_at_ms, device_class, reports_stored)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1)
                 ON CONFLICT (device_id) DO UPDATE SET
                   status_sequence = excluded.status_sequence,
                   status = excluded.status,
                   status_at_ms = excluded.status_at_ms,
                   device_class = coalesce(excluded.device_class, device_class),
                   reports_stored = reports_stored + 1",
                params![
                    w.device_id,
                    to_sql(w.sequence),
                    w.report,
                    to_sql(now_ms),
                    w.device_class.filter(|c| !c.is_empty())
                ],
            )
            .map_err(|e| err(path, e))?;
        Ok(StatusOutcome::Stored)
    }
}

fn row_to_state(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceState> {
    let seq: Option<i64> = r.get(1)?;
    let status: Option<Vec<u8>> = r.get(2)?;
    let status_at: Option<i64> = r.get(3)?;
    let presence: Option<Vec<u8>> = r.get(4)?;
    let presence_at: Option<i64> = r.get(5)?;
    Ok(DeviceState {
        device_id: r.get(0)?,
        status: match (seq, status, status_at) {
            (Some(s), Some(b), Some(t)) => Some((from_sql(s), b, from_sql(t))),
            _ => None,
        },
        presence: presence.zip(presence_at).map(|(b, t)| (b, from_sql(t))),
        device_class: r.get(6)?,
        reports_stored: from_sql(r.get(7)?),
        trust: r
            .get::<_, Option<Vec<u8>>>(8)?
            .zip(r.get::<_, Option<i64>>(9)?)
            .map(|(b, t)| (b, from_sql(t))),
    })
}
