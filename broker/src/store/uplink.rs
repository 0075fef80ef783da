//! The bridge's store-and-forward queue: messages bound upstream, in the order they were
//! taken, kept until the upstream broker acknowledges them. Stored status reports enter it in
//! the same transaction that stores them (before the device's acknowledgement), so nothing a
//! device saw acknowledged can be lost on its way up, even to a SIGKILL.

use rusqlite::{params, Transaction};

use super::{err, from_sql, to_sql, Store, StoreError};

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Queue position (increasing).
    pub seq: i64,
    /// Local topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// When it was queued.
    pub enqueued_at_ms: u64,
}

/// Size of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages queued.
    pub depth: u64,
    /// Their payload and topic bytes.
    pub bytes: u64,
    /// When the oldest was queued (0 when empty).
    pub oldest_at_ms: u64,
}

pub(super) fn enqueue_in(
    tx: &Transaction<'_>,
    topic: &str,
    payload: &[u8],
    now_ms: u64,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO uplink_queue (topic, payload, enqueued_at_ms) VALUES (?1, ?2, ?3)",
        params![topic, payload, to_sql(now_ms)],
    )
    .map(|_| ())
}

impl Store {
    /// Stored status reports are also queued upstream (the bridge is on).
    pub fn set_uplink_status(&mut self, on: bool) {
        self.uplink_status = on;
    }

    /// Queues messages (local topic, payload) in one transaction, in order.
    pub fn enqueue_uplink(
        &mut self,
        msgs: &[(String, Vec<u8>)],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| err(&path, e))?;
        for (topic, payload) in msgs {
            enqueue_in(&tx, topic, payload, now_ms).map_err(|e| err(&path, e))?;
        }
        tx.commit().map_err(|e| err(&path, e))
    }

    /// Up to `limit` queued messages after position `after`, oldest first.
    pub fn uplink_after(&self, after: i64, limit: usize) -> Result<Vec<Queued>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, topic, payload, enqueued_at_ms FROM uplink_queue
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| {
                Ok(Queued {
                    seq: r.get(0)?,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    enqueued_at_ms: from_sql(r.get(3)?),
                })
            })
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| err(&self.path, e))
    }

    /// Removes acknowledged messages.
    pub fn uplink_done(&mut self, seqs: &[i64]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| err(&path, e))?;
        for s in seqs {
            tx.execute("DELETE FROM uplink_queue WHERE seq = ?1", [s])
                .map_err(|e| err(&path, e))?;
        }
        tx.commit().map_err(|e| err(&path, e))
    }

    /// Depth, bytes and age of the queue.
    pub fn uplink_stats(&self) -> Result<QueueStats, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(payload) + length(topic)), 0),
                        coalesce(min(enqueued_at_ms), 0)
                 FROM uplink_queue",
                [],
                |r| {
                    Ok(QueueStats {
                        depth: from_sql(r.get(0)?),
                        bytes: from_sql(r.get(1)?),
                        oldest_at_ms: from_sql(r.get(2)?),
                    })
                },
            )
            .map_err(|e| err(&self.path, e))
    }

    /// Keeps the queue within `max_bytes` by deleting its oldest messages (the overflow
    /// policy: the newest state matters most); how many were deleted.
    pub fn uplink_trim(&mut self, max_bytes: u64) -> Result<u64, StoreError> {
        let mut dropped = 0;
        loop {
            let stats = self.uplink_stats()?;
            if stats.bytes <= max_bytes {
                return Ok(dropped);
            }
            // Delete in slices of the oldest 256 to converge quickly.
            let n = self
                .conn
                .execute(
                    "DELETE FROM uplink_queue WHERE seq IN
                       (SELECT seq FROM uplink_queue ORDER BY seq LIMIT 256)",
                    [],
                )
                .map_err(|e| err(&self.path, e))?;
            if n == 0 {
                return Ok(dropped);
            }
            dropped += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::StatusWrite;

    #[test]
    fn the_queue_keeps_order_until_acknowledged_and_status_joins_it_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        s.enqueue_uplink(
            &[("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())],
            5,
        )
        .unwrap();
        s.set_uplink_status(true);
        let w = StatusWrite {
            device_id: "dev-1",
            sequence: 1,
            report: b"r",
            device_class: None,
        };
        s.put_statuses(&[w, w], 6).unwrap(); // the second is stale: queued once
        let q = s.uplink_after(0, 10).unwrap();
        let topics: Vec<&str> = q.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["a", "b", "devices/dev-1/status"]);
        assert_eq!(s.uplink_after(q[1].seq, 10).unwrap().len(), 1);
        s.uplink_done(&[q[0].seq]).unwrap();
        let st = s.uplink_stats().unwrap();
        assert_eq!((st.depth, st.oldest_at_ms), (2, 5));
        assert_eq!(s.uplink_trim(1_000).unwrap(), 0);
        assert_eq!(s.uplink_trim(0).unwrap(), 2);
        assert_eq!(s.uplink_stats().unwrap(), QueueStats::default());
    }
}
