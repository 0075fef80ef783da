//! The chain of trust as the gateway keeps it: the newest roots it distributes (each exactly
//! as received, checked before it was stored) and every device's last trust report.

use rusqlite::{params, OptionalExtension};

use super::{err, from_sql, to_sql, Store, StoreError};

impl Store {
    /// The stored roots as (version, SignedRoot bytes), oldest first.
    pub(crate) fn trust_roots(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT version, signed_root FROM trust_roots ORDER BY version")
            .map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map([], |r| Ok((from_sql(r.get(0)?), r.get(1)?)))
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| err(&self.path, e))
    }

    /// Adds a root (checked by the caller) and forgets all but the newest `keep`, in one
    /// transaction.
    pub(crate) fn add_trust_root(
        &mut self,
        version: u64,
        signed_root: &[u8],
        keep: usize,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        tx.execute(
            "INSERT INTO trust_roots (version, signed_root, added_at_ms) VALUES (?1, ?2, ?3)",
            params![to_sql(version), signed_root, to_sql(now_ms)],
        )
        .map_err(|e| err(&path, e))?;
        tx.execute(
            "DELETE FROM trust_roots WHERE version NOT IN
               (SELECT version FROM trust_roots ORDER BY version DESC LIMIT ?1)",
            [i64::try_from(keep).unwrap_or(i64::MAX)],
        )
        .map_err(|e| err(&path, e))?;
        tx.commit().map_err(|e| err(&path, e))
    }

    /// Stores a device's trust report (as received); returns the one it replaces, if any.
    pub(crate) fn put_trust_report(
        &mut self,
        device_id: &str,
        report: &[u8],
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        let old: Option<Vec<u8>> = tx
            .query_row(
                "SELECT trust FROM device_state WHERE device_id = ?1",
                [device_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| err(&path, e))?
            .flatten();
        tx.execute(
            "INSERT INTO device_state (device_id, trust, trust_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (device_id) DO UPDATE SET
               trust = excluded.trust, trust_at_ms = excluded.trust_at_ms",
            params![device_id, report, to_sql(now_ms)],
        )
        .map_err(|e| err(&path, e))?;
        tx.commit().map_err(|e| err(&path, e))?;
        Ok(old)
    }

    /// Every device's last trust report, as (device id, report bytes).
    pub(crate) fn trust_reports(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT device_id, trust FROM device_state WHERE trust IS NOT NULL
                 ORDER BY device_id",
            )
            .map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| err(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keeps_the_newest_roots_and_the_last_report() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        for v in 1..=10u64 {
            s.add_trust_root(v, &[v as u8], 8, 100).unwrap();
        }
        let roots = s.trust_roots().unwrap();
        assert_eq!(roots.len(), 8);
        assert_eq!(roots[0], (3, vec![3]));
        assert_eq!(roots[7], (10, vec![10]));
        assert_eq!(s.put_trust_report("dev-1", b"a", 5).unwrap(), None);
        assert_eq!(
            s.put_trust_report("dev-1", b"b", 6).unwrap(),
            Some(b"a".to_vec())
        );
        assert_eq!(
            s.trust_reports().unwrap(),
            [("dev-1".to_string(), b"b".to_vec())]
        );
        let st = s.device_state("dev-1").unwrap().unwrap();
        assert_eq!(st.trust, Some((b"b".to_vec(), 6)));
    }
}
