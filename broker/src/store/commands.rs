//! The command service's table: every command for every device, from acceptance to its final
//! state. A command is *open* while PENDING or DELIVERED; a result, or its expiry, closes it,
//! and a closed command never changes again.

use fleet_proto::v1::{Command, CommandState, Signature, SignedCommand};
use fleet_proto::Message;
use rusqlite::{params, OptionalExtension, Row};
use sha2::{Digest as _, Sha256};

use super::{err, from_sql, to_sql, Store, StoreError};

/// One command for one device, as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredCommand {
    /// The target device.
    pub device_id: String,
    /// The command id (idempotency key per device).
    pub command_id: String,
    /// Command name.
    pub name: String,
    /// Argument bytes.
    pub payload: Vec<u8>,
    /// The submitting service.
    pub issued_by: String,
    /// When it was accepted.
    pub issued_at_ms: u64,
    /// When it expires (0: never).
    pub expires_at_ms: u64,
    /// Times handed to the device.
    pub attempts: u32,
    /// Where it is.
    pub state: CommandState,
    /// The result (protobuf CommandResult), once closed.
    pub result: Option<Vec<u8>>,
    /// When the state last changed.
    pub updated_at_ms: u64,
    /// The encoded Command exactly as its issuer signed it (or as the gateway built it for an
    /// unsigned submission); empty for a command stored before commands were signed.
    pub command: Vec<u8>,
    /// The issuer's signatures over `command` (none: unsigned).
    pub signatures: Vec<Signature>,
    /// Not handed to the device before this instant (0: no lower bound).
    pub not_before_ms: u64,
}

impl StoredCommand {
    /// Whether `other` asks for the same thing: for signed commands the same signed bytes
    /// (whoever hands them in); for unsigned ones the same name, payload and issuer.
    fn same_request(&self, other: &StoredCommand) -> bool {
        let same_target = self.device_id == other.device_id && self.command_id == other.command_id;
        match (self.signatures.is_empty(), other.signatures.is_empty()) {
            (false, false) => same_target && self.command == other.command,
            (true, true) => {
                same_target
                    && self.name == other.name
                    && self.payload == other.payload
                    && self.issued_by == other.issued_by
            }
            _ => false,
        }
    }

    /// The Command bytes handed to the device: the stored ones, or for a command stored before
    /// commands were signed, the unsigned Command made from its fields.
    pub(crate) fn command_bytes(&self) -> Vec<u8> {
        if !self.command.is_empty() {
            return self.command.clone();
        }
        Command {
            command_id: self.command_id.clone(),
            name: self.name.clone(),
            payload: self.payload.clone(),
            issued_at_ms: self.issued_at_ms,
            expires_at_ms: self.expires_at_ms,
            issued_by: self.issued_by.clone(),
            device_id: self.device_id.clone(),
            device_class: String::new(),
            not_before_ms: 0,
        }
        .encode_to_vec()
    }

    /// SHA-256 of [`Self::command_bytes`]: what a device's result names
    /// (`CommandResult.command_digest`) when it answers this command.
    pub(crate) fn digest(&self) -> Vec<u8> {
        Sha256::digest(self.command_bytes()).to_vec()
    }

    /// What delivery number `attempt` puts on the device's command topic.
    pub(crate) fn delivery(&self) -> SignedCommand {
        SignedCommand {
            command: self.command_bytes(),
            signatures: self.signatures.clone(),
            attempt: self.attempts,
            submitted_by: self.issued_by.clone(),
        }
    }
}

/// The signatures column: an encoded SignedCommand holding only them; NULL for none.
fn signatures_blob(signatures: &[Signature]) -> Option<Vec<u8>> {
    (!signatures.is_empty()).then(|| {
        SignedCommand {
            signatures: signatures.to_vec(),
            ..SignedCommand::default()
        }
        .encode_to_vec()
    })
}

/// [`CommandState::is_open`] in SQL (the partial indexes of migration 2 use the same text);
/// a unit test checks that the two agree on every state.
const OPEN: &str = "state IN (1, 2)";

/// What became of a submitted command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Submitted {
    /// Stored as new.
    New(StoredCommand),
    /// The same command was submitted before: here is its current state.
    Existing(StoredCommand),
    /// The id is taken by a different command for this device.
    Conflict(StoredCommand),
}

const COLUMNS: &str = "device_id, command_id, name, payload, issued_by, issued_at_ms, \
                       expires_at_ms, attempts, state, result, updated_at_ms, command, \
                       signatures, not_before_ms";

fn row(r: &Row<'_>) -> rusqlite::Result<StoredCommand> {
    let state: i32 = r.get(8)?;
    Ok(StoredCommand {
        device_id: r.get(0)?,
        command_id: r.get(1)?,
        name: r.get(2)?,
        payload: r.get(3)?,
        issued_by: r.get(4)?,
        issued_at_ms: from_sql(r.get(5)?),
        expires_at_ms: from_sql(r.get(6)?),
        attempts: r.get(7)?,
        state: CommandState::try_from(state).unwrap_or(CommandState::Unspecified),
        result: r.get(9)?,
        updated_at_ms: from_sql(r.get(10)?),
        command: r.get::<_, Option<Vec<u8>>>(11)?.unwrap_or_default(),
        // Written by this module from decoded signatures: it decodes (an unreadable value
        // would deliver the command unsigned, which a device with a root refuses).
        signatures: r
            .get::<_, Option<Vec<u8>>>(12)?
            .and_then(|b| SignedCommand::decode(b.as_slice()).ok())
            .map(|s| s.signatures)
            .unwrap_or_default(),
        not_before_ms: from_sql(r.get(13)?),
    })
}

impl Store {
    /// Stores new commands (one per target device) in one transaction. A command whose
    /// (device, id) exists is not changed: it is answered as `Existing` when it asks for the same
    /// thing, `Conflict` otherwise. All or nothing: if any is a `Conflict`, nothing is stored
    /// (the `New` answers then say what would have been stored).
    pub(crate) fn submit_commands(
        &mut self,
        commands: &[StoredCommand],
    ) -> Result<Vec<Submitted>, StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        let mut out = Vec::with_capacity(commands.len());
        for c in commands {
            let found = tx
                .query_row(
                    &format!(
                        "SELECT {COLUMNS} FROM commands WHERE device_id = ?1 AND command_id = ?2"
                    ),
                    params![c.device_id, c.command_id],
                    row,
                )
                .optional()
                .map_err(|e| err(&path, e))?;
            match found {
                Some(old) if old.same_request(c) => out.push(Submitted::Existing(old)),
                Some(old) => out.push(Submitted::Conflict(old)),
                None => {
                    tx.execute(
                        &format!(
                            "INSERT INTO commands ({COLUMNS})
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13,
                                     ?14)"
                        ),
                        params![
                            c.device_id,
                            c.command_id,
                            c.name,
                            c.payload,
                            c.issued_by,
                            to_sql(c.issued_at_ms),
                            to_sql(c.expires_at_ms),
                            c.attempts,
                            c.state as i32,
                            c.result,
                            to_sql(c.updated_at_ms),
                            (!c.command.is_empty()).then_some(&c.command),
                            signatures_blob(&c.signatures),
                            to_sql(c.not_before_ms),
                        ],
                    )
                    .map_err(|e| err(&path, e))?;
                    out.push(Submitted::New(c.clone()));
                }
            }
        }
        if out.iter().any(|o| matches!(o, Submitted::Conflict(_))) {
            // Dropping the transaction rolls it back.
            return Ok(out);
        }
        tx.commit().map_err(|e| err(&path, e))?;
        Ok(out)
    }

    /// A device's open commands that have not expired at `now_ms` and are not held back (their
    /// not-before time has come), oldest first.
    pub(crate) fn open_commands(
        &self,
        device_id: &str,
        now_ms: u64,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        self.select_commands(
            &format!(
                "WHERE device_id = ?1 AND {OPEN}
                   AND (expires_at_ms = 0 OR expires_at_ms > ?2) AND not_before_ms <= ?2
                 ORDER BY issued_at_ms, command_id"
            ),
            params![device_id, to_sql(now_ms)],
        )
    }

    /// PENDING commands whose not-before time has come by `now_ms` and that have not expired:
    /// held until now, to be handed over if their device is connected.
    pub(crate) fn released_commands(&self, now_ms: u64) -> Result<Vec<StoredCommand>, StoreError> {
        self.select_commands(
            "WHERE state = 1 AND not_before_ms != 0 AND not_before_ms <= ?1
               AND (expires_at_ms = 0 OR expires_at_ms > ?1)
             ORDER BY device_id, issued_at_ms",
            params![to_sql(now_ms)],
        )
    }

    /// The earliest not-before time after `now_ms` among PENDING commands: when a held command
    /// is next released.
    pub(crate) fn next_release(&self, now_ms: u64) -> Result<Option<u64>, StoreError> {
        self.conn
            .query_row(
                "SELECT min(not_before_ms) FROM commands
                 WHERE state = 1 AND not_before_ms != 0 AND not_before_ms > ?1",
                [to_sql(now_ms)],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|v| v.map(from_sql))
            .map_err(|e| err(&self.path, e))
    }

    /// One device's command, open or closed.
    pub(crate) fn command(
        &self,
        device_id: &str,
        command_id: &str,
    ) -> Result<Option<StoredCommand>, StoreError> {
        Ok(self
            .select_commands(
                "WHERE device_id = ?1 AND command_id = ?2",
                params![device_id, command_id],
            )?
            .pop())
    }

    /// `SELECT {COLUMNS} FROM commands {tail}` with `params`, as stored commands.
    fn select_commands(
        &self,
        tail: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM commands {tail}"))
            .map_err(|e| err(&self.path, e))?;
        let rows = stmt
            .query_map(params, row)
            .map_err(|e| err(&self.path, e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| err(&self.path, e))
    }

    /// How many open commands each of `devices` has.
    pub(crate) fn open_counts(&self, devices: &[String]) -> Result<Vec<u32>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT count(*) FROM commands WHERE device_id = ?1 AND {OPEN}"
            ))
            .map_err(|e| err(&self.path, e))?;
        devices
            .iter()
            .map(|d| {
                stmt.query_row([d], |r| r.get(0))
                    .map_err(|e| err(&self.path, e))
            })
            .collect()
    }

    /// DELIVERED commands last handed over at or before `before_ms` and not expired at
    /// `now_ms`: due for another hand-over if their device is connected.
    pub(crate) fn overdue_commands(
        &self,
        before_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        self.select_commands(
            "WHERE state = 2 AND updated_at_ms <= ?1
               AND (expires_at_ms = 0 OR expires_at_ms > ?2)
             ORDER BY device_id, issued_at_ms",
            params![to_sql(before_ms), to_sql(now_ms)],
        )
    }

    /// Records one more hand-over to the device: attempts + 1, state DELIVERED. Returns the
    /// updated command, or `None` if it is no longer open or is held until a later
    /// not-before time.
    pub(crate) fn mark_delivered(
        &mut self,
        device_id: &str,
        command_id: &str,
        now_ms: u64,
    ) -> Result<Option<StoredCommand>, StoreError> {
        self.conn
            .query_row(
                &format!(
                    "UPDATE commands SET attempts = attempts + 1, state = ?3, updated_at_ms = ?4
                     WHERE device_id = ?1 AND command_id = ?2 AND {OPEN} AND not_before_ms <= ?4
                     RETURNING {COLUMNS}"
                ),
                params![
                    device_id,
                    command_id,
                    CommandState::Delivered as i32,
                    to_sql(now_ms)
                ],
                row,
            )
            .optional()
            .map_err(|e| err(&self.path, e))
    }

    /// Closes an open command with the device's result. Returns the closed command, or `None`
    /// if there is no such open command (unknown, or already closed: a duplicate result).
    pub(crate) fn close_command(
        &mut self,
        device_id: &str,
        command_id: &str,
        state: CommandState,
        result: &[u8],
        now_ms: u64,
    ) -> Result<Option<StoredCommand>, StoreError> {
        self.conn
            .query_row(
                &format!(
                    "UPDATE commands SET state = ?3, result = ?4, updated_at_ms = ?5
                     WHERE device_id = ?1 AND command_id = ?2 AND {OPEN}
                     RETURNING {COLUMNS}"
                ),
                params![device_id, command_id, state as i32, result, to_sql(now_ms)],
                row,
            )
            .optional()
            .map_err(|e| err(&self.path, e))
    }

    /// Closes every open command whose expiry is at or before `now_ms` as EXPIRED with the
    /// `result` made by `result_for`, in one transaction. Returns the closed commands.
    pub(crate) fn expire_commands(
        &mut self,
        now_ms: u64,
        result_for: impl Fn(&StoredCommand) -> Vec<u8>,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(&path, e))?;
        let due: Vec<StoredCommand> = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM commands
                     WHERE {OPEN} AND expires_at_ms != 0 AND expires_at_ms <= ?1"
                ))
                .map_err(|e| err(&path, e))?;
            let rows = stmt
                .query_map([to_sql(now_ms)], row)
                .map_err(|e| err(&path, e))?;
            rows.collect::<Result<_, _>>().map_err(|e| err(&path, e))?
        };
        let mut closed = Vec::with_capacity(due.len());
        for mut c in due {
            let result = result_for(&c);
            tx.execute(
                "UPDATE commands SET state = ?3, result = ?4, updated_at_ms = ?5
                 WHERE device_id = ?1 AND command_id = ?2",
                params![
                    c.device_id,
                    c.command_id,
                    CommandState::Expired as i32,
                    result,
                    to_sql(now_ms)
                ],
            )
            .map_err(|e| err(&path, e))?;
            c.state = CommandState::Expired;
            c.result = Some(result);
            c.updated_at_ms = now_ms;
            closed.push(c);
        }
        tx.commit().map_err(|e| err(&path, e))?;
        Ok(closed)
    }

    /// The earliest expiry among open commands.
    pub(crate) fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        self.conn
            .query_row(
                &format!(
                    "SELECT min(expires_at_ms) FROM commands WHERE {OPEN} AND expires_at_ms != 0"
                ),
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|v| v.map(from_sql))
            .map_err(|e| err(&self.path, e))
    }

    /// The earliest last hand-over among DELIVERED, unexpired (at `now_ms`) commands handed
    /// over after `after_ms`, i.e. those not yet overdue when `after_ms` is `now_ms` minus
    /// `redeliver_after`: the next re-delivery falls due `redeliver_after` after it. Overdue
    /// ones are left out: a sweep already handled them (re-delivered, or kept for the device's
    /// reconnection, which delivers every open command).
    pub(crate) fn oldest_fresh_delivery(
        &self,
        after_ms: u64,
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.conn
            .query_row(
                "SELECT min(updated_at_ms) FROM commands
                 WHERE state = 2 AND updated_at_ms > ?1
                   AND (expires_at_ms = 0 OR expires_at_ms > ?2)",
                params![to_sql(after_ms), to_sql(now_ms)],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|v| v.map(from_sql))
            .map_err(|e| err(&self.path, e))
    }

    /// A command's records: for one device, or for every target when `device_id` is `None`.
    pub(crate) fn get_command(
        &self,
        command_id: &str,
        device_id: Option<&str>,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        self.select_commands(
            "WHERE command_id = ?1 AND (?2 IS NULL OR device_id = ?2) ORDER BY device_id",
            params![command_id, device_id],
        )
    }

    /// Forgets closed commands last changed before `before_ms`. Returns how many.
    pub(crate) fn prune_commands(&mut self, before_ms: u64) -> Result<usize, StoreError> {
        self.conn
            .execute(
                &format!("DELETE FROM commands WHERE NOT {OPEN} AND updated_at_ms < ?1"),
                [to_sql(before_ms)],
            )
            .map_err(|e| err(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cmd(dev: &str, id: &str, expires: u64) -> StoredCommand {
        StoredCommand {
            device_id: dev.into(),
            command_id: id.into(),
            name: "reboot".into(),
            payload: b"now".to_vec(),
            issued_by: "svc-1".into(),
            issued_at_ms: 100,
            expires_at_ms: expires,
            attempts: 0,
            state: CommandState::Pending,
            result: None,
            updated_at_ms: 100,
            command: Vec::new(),
            signatures: Vec::new(),
            not_before_ms: 0,
        }
    }

    fn signed(dev: &str, id: &str, command: &[u8]) -> StoredCommand {
        StoredCommand {
            command: command.to_vec(),
            signatures: vec![Signature {
                key_id: "k1".into(),
                signature: vec![7; 64],
                ..Signature::default()
            }],
            ..cmd(dev, id, 0)
        }
    }

    #[test]
    fn signed_commands_keep_their_bytes_and_conflict_on_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        let c = signed("dev-1", "c1", b"signed bytes");
        s.submit_commands(std::slice::from_ref(&c)).unwrap();
        let got = s.command("dev-1", "c1").unwrap().unwrap();
        assert_eq!(got, c);
        assert_eq!(got.delivery().command, b"signed bytes");
        assert_eq!(got.digest(), Sha256::digest(b"signed bytes").to_vec());
        // The same bytes from another service: the same command.
        let mut again = c.clone();
        again.issued_by = "svc-2".into();
        assert!(matches!(
            s.submit_commands(&[again]).unwrap()[0],
            Submitted::Existing(_)
        ));
        // Other bytes, or the same id unsigned: a conflict.
        let other = signed("dev-1", "c1", b"other bytes");
        assert!(matches!(
            s.submit_commands(&[other]).unwrap()[0],
            Submitted::Conflict(_)
        ));
        assert!(matches!(
            s.submit_commands(&[cmd("dev-1", "c1", 0)]).unwrap()[0],
            Submitted::Conflict(_)
        ));
    }

    #[test]
    fn a_held_command_is_released_at_its_not_before_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        let mut c = cmd("dev-1", "later", 10_000);
        c.not_before_ms = 500;
        s.submit_commands(&[c, cmd("dev-1", "now", 10_000)])
            .unwrap();
        let open: Vec<_> = s
            .open_commands("dev-1", 499)
            .unwrap()
            .into_iter()
            .map(|c| c.command_id)
            .collect();
        assert_eq!(open, ["now"]);
        assert_eq!(s.next_release(499).unwrap(), Some(500));
        // Not handed over early, whoever asks.
        assert!(s.mark_delivered("dev-1", "later", 499).unwrap().is_none());
        assert!(s.released_commands(499).unwrap().is_empty());
        assert_eq!(s.released_commands(500).unwrap()[0].command_id, "later");
        assert_eq!(s.open_commands("dev-1", 500).unwrap().len(), 2);
        assert_eq!(s.next_release(500).unwrap(), None);
    }

    #[test]
    fn a_command_lives_from_pending_to_one_final_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        let c = cmd("dev-1", "c1", 0);
        assert!(matches!(
            s.submit_commands(std::slice::from_ref(&c)).unwrap()[0],
            Submitted::New(_)
        ));
        // Same again: existing; different payload under the same id: conflict.
        assert!(matches!(
            s.submit_commands(std::slice::from_ref(&c)).unwrap()[0],
            Submitted::Existing(_)
        ));
        let mut other = c.clone();
        other.payload = b"later".to_vec();
        let mut fresh = cmd("dev-2", "c1", 0);
        fresh.issued_at_ms = 101;
        let outcome = s.submit_commands(&[fresh, other]).unwrap();
        assert!(matches!(outcome[1], Submitted::Conflict(_)));
        // All or nothing: the new one for dev-2 was not stored either.
        assert!(s.open_commands("dev-2", 200).unwrap().is_empty());
        assert_eq!(s.open_commands("dev-1", 200).unwrap().len(), 1);
        assert_eq!(
            s.open_counts(&["dev-1".into(), "dev-9".into()]).unwrap(),
            [1, 0]
        );
        let d = s.mark_delivered("dev-1", "c1", 150).unwrap().unwrap();
        assert_eq!((d.attempts, d.state), (1, CommandState::Delivered));
        assert!(s.overdue_commands(149, 200).unwrap().is_empty());
        assert_eq!(s.overdue_commands(150, 200).unwrap().len(), 1);
        // Fresh (not yet overdue) hand-overs are what the next re-delivery waits for.
        assert_eq!(s.oldest_fresh_delivery(149, 200).unwrap(), Some(150));
        assert_eq!(s.oldest_fresh_delivery(150, 200).unwrap(), None);
        let d = s.mark_delivered("dev-1", "c1", 160).unwrap().unwrap();
        assert_eq!(d.attempts, 2);
        let closed = s
            .close_command("dev-1", "c1", CommandState::Succeeded, b"r", 170)
            .unwrap()
            .unwrap();
        assert_eq!(closed.result.as_deref(), Some(&b"r"[..]));
        // A second result (a re-sent one) changes nothing.
        assert!(s
            .close_command("dev-1", "c1", CommandState::Failed, b"x", 180)
            .unwrap()
            .is_none());
        assert!(s.mark_delivered("dev-1", "c1", 190).unwrap().is_none());
        assert!(s.open_commands("dev-1", 200).unwrap().is_empty());
        let got = s.get_command("c1", None).unwrap();
        assert_eq!(got[0].state, CommandState::Succeeded);
        assert_eq!(s.prune_commands(171).unwrap(), 1);
        assert!(s.get_command("c1", None).unwrap().is_empty());
    }

    #[test]
    fn sql_open_predicate_is_the_proto_definition() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_in(dir.path()).unwrap();
        // Every declared state and a value off the wire that is none of them.
        for v in 0..=8i32 {
            let sql: bool = s
                .conn
                .query_row(
                    &format!("SELECT {}", OPEN.replace("state", &v.to_string())),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let state = CommandState::try_from(v).unwrap_or(CommandState::Unspecified);
            assert_eq!(sql, state.is_open(), "state value {v}");
            if state.is_final() {
                assert!(!sql, "final state {v} counted as open");
            }
        }
    }

    #[test]
    fn expiry_closes_open_commands_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open_in(dir.path()).unwrap();
        s.submit_commands(&[
            cmd("dev-1", "soon", 1_000),
            cmd("dev-1", "late", 5_000),
            cmd("dev-2", "never", 0),
        ])
        .unwrap();
        assert_eq!(s.next_expiry().unwrap(), Some(1_000));
        // Not offered once expired, even before the sweep.
        assert_eq!(s.open_commands("dev-1", 1_000).unwrap().len(), 1);
        let closed = s.expire_commands(1_000, |_| b"expired".to_vec()).unwrap();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].command_id, "soon");
        assert_eq!(s.next_expiry().unwrap(), Some(5_000));
        assert!(s
            .close_command("dev-1", "soon", CommandState::Succeeded, b"", 1_001)
            .unwrap()
            .is_none());
        assert_eq!(s.open_commands("dev-2", u64::MAX / 2).unwrap().len(), 1);
    }
}
