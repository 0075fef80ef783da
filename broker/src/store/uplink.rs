//! The bridge's store-and-forward queue: messages bound upstream, in the order they were
//! taken, kept until the upstream broker acknowledges them. A caller that must store something
//! and queue it upward atomically (a status report, before the device's acknowledgement) uses
//! [`WriteTx::enqueue_uplink`] inside one [`Store::write`].

use rusqlite::params;

use super::{err, from_sql, to_sql, Store, StoreError, WriteTx};

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Queued {
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
pub(crate) struct QueueStats {
    /// Messages queued.
    pub depth: u64,
    /// Their payload and topic bytes.
    pub bytes: u64,
    /// When the oldest was queued (0 when empty).
    pub oldest_at_ms: u64,
}

impl WriteTx<'_> {
    /// Queues one message (local topic, payload) upward inside a larger transaction.
    pub(crate) fn enqueue_uplink(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO uplink_queue (topic, payload, enqueued_at_ms) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut st| st.execute(params![topic, payload, to_sql(now_ms)]))
            .map(|_| ())
            .map_err(|e| err(self.path, e))
    }
}

impl Store {
    /// Queues messages (local topic, payload) in one transaction, in order.
    pub(crate) fn enqueue_uplink(
        &mut self,
        msgs: &[(String, Vec<u8>)],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            msgs.iter()
                .try_for_each(|(topic, payload)| tx.enqueue_uplink(topic, payload, now_ms))
        })
    }

    /// Up to `limit` queued messages after position `after`, oldest first.
    pub(crate) fn uplink_after(&self, after: i64, limit: usize) -> Result<Vec<Queued>, StoreError> {
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
    pub(crate) fn uplink_done(&mut self, seqs: &[i64]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        for s in seqs {
            tx.execute("DELETE FROM uplink_queue WHERE seq = ?1", [s])
                .map_err(|e| err(&path, e))?;
        }
        tx.commit().map_err(|e| err(&path, e))
    }

    /// Depth, bytes and age of the queue.
    pub(crate) fn uplink_stats(&self) -> Result<QueueStats, StoreError> {
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
    pub(crate) fn uplink_trim(&mut self, max_bytes: u64) -> Result<u64, StoreError> {
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

    #[test]
    fn the_queue_keeps_order_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        s.enqueue_uplink(
            &[("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())],
            5,
        )
        .unwrap();
        s.write(|tx| tx.enqueue_uplink("c", b"3", 6)).unwrap();
        let q = s.uplink_after(0, 10).unwrap();
        let topics: Vec<&str> = q.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["a", "b", "c"]);
        assert_eq!(s.uplink_after(q[1].seq, 10).unwrap().len(), 1);
        s.uplink_done(&[q[0].seq]).unwrap();
        let st = s.uplink_stats().unwrap();
        assert_eq!((st.depth, st.oldest_at_ms), (2, 5));
        assert_eq!(s.uplink_trim(1_000).unwrap(), 0);
        assert_eq!(s.uplink_trim(0).unwrap(), 2);
        assert_eq!(s.uplink_stats().unwrap(), QueueStats::default());
    }
}
