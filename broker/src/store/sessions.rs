//! The MQTT core's durable state: persistent sessions (subscriptions, queued messages, incoming
//! QoS 2 ids awaiting PUBREL) and retained messages, in the tables of migration 7.
//!
//! The engine describes every change as a numbered [`StoreOp`]; [`apply`] writes a run of them
//! inside the caller's one transaction, and [`Store::load_sessions`] gives the state back on
//! start-up for `Engine::restore`. Each op is one indexed write of one row (or, for a reset, of
//! one key's rows), through cached statements.
//!
//! Applying ops is idempotent and never fails for rows that are missing: dequeuing an id that
//! is not queued, releasing an unknown QoS 2 id or unsubscribing a filter that is not stored
//! changes nothing. An op that adds state for a session the store does not know (a
//! subscription, a queued message, a QoS 2 id) creates the session, so nothing the engine
//! wrote is lost even if it never announced the session with [`StoreOp::SessionReset`].
//!
//! Two normalisations happen on the way through: a key's instance is stored as `''` when it has
//! none, so `Some("")` comes back as `None`; and a retained message comes back with its row's
//! topic and `retain` set, whatever the [`Message`] written said.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use fleet_mqtt::{Message, QoS, Role, SessionKey, StoreOp, StoreSeq, StoredMessage, StoredSession};
use rusqlite::types::Type;
use rusqlite::{params, Connection, Row};

use super::{err, from_sql, to_sql, Store, StoreError, WriteTx};

/// Applies `ops` in order inside the transaction `w` (committed or rolled back by its owner, so
/// a batch is all or nothing). The sequence numbers are the engine's; they are not stored.
pub(crate) fn apply(w: &mut WriteTx<'_>, ops: &[(StoreSeq, StoreOp)]) -> Result<(), StoreError> {
    ops.iter()
        .try_for_each(|(_, op)| apply_one(&w.tx, op))
        .map_err(|e| err(w.path, e))
}

impl Store {
    /// Every stored persistent session (by key; subscriptions by filter, queue by message
    /// number, QoS 2 ids ascending) and every retained message (by topic), read in one
    /// consistent snapshot.
    pub(crate) fn load_sessions(&self) -> Result<(Vec<StoredSession>, Vec<Message>), StoreError> {
        load(&self.conn).map_err(|e| err(&self.path, e))
    }
}

/// The columns of a [`SessionKey`].
struct Key<'a> {
    role: &'static str,
    id: &'a str,
    instance: &'a str,
}

impl<'a> Key<'a> {
    fn of(key: &'a SessionKey) -> Self {
        Key {
            role: role_text(key.role),
            id: &key.id,
            instance: key.instance.as_deref().unwrap_or(""),
        }
    }
}

fn role_text(role: Role) -> &'static str {
    match role {
        Role::Device => "device",
        Role::Service => "service",
        Role::Gateway => "gateway",
        Role::Internal => "internal",
    }
}

fn apply_one(tx: &Connection, op: &StoreOp) -> rusqlite::Result<()> {
    match op {
        StoreOp::SessionReset { key, persistent } => {
            let k = Key::of(key);
            clear(tx, &k)?;
            if *persistent {
                ensure_session(tx, &k)
            } else {
                forget_session(tx, &k)
            }
        }
        StoreOp::SessionExpired { key } => {
            let k = Key::of(key);
            clear(tx, &k)?;
            forget_session(tx, &k)
        }
        StoreOp::Subscribed { key, filter, qos } => {
            let k = Key::of(key);
            ensure_session(tx, &k)?;
            exec(
                tx,
                sql::SUBSCRIBE,
                params![k.role, k.id, k.instance, filter, *qos as u8],
            )
        }
        StoreOp::Unsubscribed { key, filter } => {
            let k = Key::of(key);
            exec(
                tx,
                sql::UNSUBSCRIBE,
                params![k.role, k.id, k.instance, filter],
            )
        }
        StoreOp::Enqueued { key, id, message } => {
            let k = Key::of(key);
            ensure_session(tx, &k)?;
            // Message numbers are never reused, so a conflict is the same op applied again:
            // the later write wins, as it would in memory.
            exec(
                tx,
                sql::ENQUEUE,
                params![
                    k.role,
                    k.id,
                    k.instance,
                    to_sql(*id),
                    &*message.topic,
                    &message.payload[..],
                    message.qos as u8,
                    message.retain,
                ],
            )
        }
        StoreOp::Released { key, id } => {
            let k = Key::of(key);
            exec(
                tx,
                sql::RELEASE,
                params![k.role, k.id, k.instance, to_sql(*id)],
            )
        }
        StoreOp::Dequeued { key, id } => {
            let k = Key::of(key);
            exec(
                tx,
                sql::DEQUEUE,
                params![k.role, k.id, k.instance, to_sql(*id)],
            )
        }
        StoreOp::Qos2Received { key, packet_id } => {
            let k = Key::of(key);
            ensure_session(tx, &k)?;
            exec(
                tx,
                sql::QOS2_RECEIVED,
                params![k.role, k.id, k.instance, packet_id],
            )
        }
        StoreOp::Qos2Released { key, packet_id } => {
            let k = Key::of(key);
            exec(
                tx,
                sql::QOS2_RELEASED,
                params![k.role, k.id, k.instance, packet_id],
            )
        }
        StoreOp::Retained {
            topic,
            message: Some(m),
        } => exec(tx, sql::RETAIN, params![topic, &m.payload[..], m.qos as u8]),
        StoreOp::Retained {
            topic,
            message: None,
        } => exec(tx, sql::UNRETAIN, params![topic]),
    }
}

fn exec(tx: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<()> {
    tx.prepare_cached(sql)?.execute(params).map(drop)
}

/// Creates the session row if missing (a lookup, no write, when it exists).
fn ensure_session(tx: &Connection, k: &Key<'_>) -> rusqlite::Result<()> {
    exec(tx, sql::SESSION_ENSURE, params![k.role, k.id, k.instance])
}

fn forget_session(tx: &Connection, k: &Key<'_>) -> rusqlite::Result<()> {
    exec(tx, sql::SESSION_FORGET, params![k.role, k.id, k.instance])
}

/// Deletes a session's subscriptions, queue and QoS 2 ids (each a range of its table's key).
fn clear(tx: &Connection, k: &Key<'_>) -> rusqlite::Result<()> {
    sql::CLEAR
        .iter()
        .try_for_each(|sql| exec(tx, sql, params![k.role, k.id, k.instance]))
}

/// The statements of [`apply`]. Each reaches its rows through a table's key (a test checks
/// every plan), so a write costs the same however many sessions and messages are stored.
mod sql {
    pub(super) const SESSION_ENSURE: &str =
        "INSERT OR IGNORE INTO mqtt_sessions (role, id, instance) VALUES (?1, ?2, ?3)";
    pub(super) const SESSION_FORGET: &str =
        "DELETE FROM mqtt_sessions WHERE role = ?1 AND id = ?2 AND instance = ?3";
    /// A session's subscriptions, queue and QoS 2 ids.
    pub(super) const CLEAR: [&str; 3] = [
        "DELETE FROM mqtt_subscriptions WHERE role = ?1 AND id = ?2 AND instance = ?3",
        "DELETE FROM mqtt_queue WHERE role = ?1 AND id = ?2 AND instance = ?3",
        "DELETE FROM mqtt_qos2_in WHERE role = ?1 AND id = ?2 AND instance = ?3",
    ];
    pub(super) const SUBSCRIBE: &str = "INSERT INTO mqtt_subscriptions
          (role, id, instance, filter, qos) VALUES (?1, ?2, ?3, ?4, ?5)
        ON CONFLICT (role, id, instance, filter) DO UPDATE SET qos = excluded.qos";
    pub(super) const UNSUBSCRIBE: &str = "DELETE FROM mqtt_subscriptions
        WHERE role = ?1 AND id = ?2 AND instance = ?3 AND filter = ?4";
    pub(super) const ENQUEUE: &str = "INSERT INTO mqtt_queue
          (role, id, instance, msg_id, topic, payload, qos, retain, released)
          VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0)
        ON CONFLICT (role, id, instance, msg_id) DO UPDATE SET
          topic = excluded.topic, payload = excluded.payload, qos = excluded.qos,
          retain = excluded.retain, released = 0";
    pub(super) const RELEASE: &str = "UPDATE mqtt_queue SET released = 1
        WHERE role = ?1 AND id = ?2 AND instance = ?3 AND msg_id = ?4";
    pub(super) const DEQUEUE: &str = "DELETE FROM mqtt_queue
        WHERE role = ?1 AND id = ?2 AND instance = ?3 AND msg_id = ?4";
    pub(super) const QOS2_RECEIVED: &str =
        "INSERT OR IGNORE INTO mqtt_qos2_in (role, id, instance, packet_id) VALUES (?1, ?2, ?3, ?4)";
    pub(super) const QOS2_RELEASED: &str = "DELETE FROM mqtt_qos2_in
        WHERE role = ?1 AND id = ?2 AND instance = ?3 AND packet_id = ?4";
    pub(super) const RETAIN: &str = "INSERT INTO mqtt_retained (topic, payload, qos)
          VALUES (?1, ?2, ?3)
        ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos";
    pub(super) const UNRETAIN: &str = "DELETE FROM mqtt_retained WHERE topic = ?1";

    /// Every statement, for the test of their plans.
    #[cfg(test)]
    pub(super) fn all() -> Vec<&'static str> {
        let mut all = vec![
            SESSION_ENSURE,
            SESSION_FORGET,
            SUBSCRIBE,
            UNSUBSCRIBE,
            ENQUEUE,
            RELEASE,
            DEQUEUE,
            QOS2_RECEIVED,
            QOS2_RELEASED,
            RETAIN,
            UNRETAIN,
        ];
        all.extend(CLEAR);
        all
    }
}

/// Reads everything back (see [`Store::load_sessions`]).
pub(crate) fn load(conn: &Connection) -> rusqlite::Result<(Vec<StoredSession>, Vec<Message>)> {
    // One read transaction: a consistent snapshot even while another connection writes.
    let tx = conn.unchecked_transaction()?;
    let mut sessions: BTreeMap<SessionKey, StoredSession> = BTreeMap::new();

    let mut st = tx.prepare("SELECT role, id, instance FROM mqtt_sessions")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        session(&mut sessions, key_at(r)?);
    }
    drop(rows);

    st = tx.prepare("SELECT role, id, instance, filter, qos FROM mqtt_subscriptions")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let sub = (r.get(3)?, qos_at(r, 4)?);
        session(&mut sessions, key_at(r)?).subscriptions.push(sub);
    }
    drop(rows);

    st = tx.prepare(
        "SELECT role, id, instance, msg_id, topic, payload, qos, retain, released FROM mqtt_queue",
    )?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let m = StoredMessage {
            id: from_sql(r.get(3)?),
            message: Message {
                topic: Arc::from(r.get::<_, String>(4)?),
                payload: Bytes::from(r.get::<_, Vec<u8>>(5)?),
                qos: qos_at(r, 6)?,
                retain: r.get(7)?,
            },
            released: r.get(8)?,
        };
        session(&mut sessions, key_at(r)?).queue.push(m);
    }
    drop(rows);

    st = tx.prepare("SELECT role, id, instance, packet_id FROM mqtt_qos2_in")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let id = r.get(3)?;
        session(&mut sessions, key_at(r)?).unreleased.push(id);
    }
    drop(rows);

    st = tx.prepare("SELECT topic, payload, qos FROM mqtt_retained ORDER BY topic")?;
    let retained = st
        .query_map([], |r| {
            Ok(Message {
                topic: Arc::from(r.get::<_, String>(0)?),
                payload: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                qos: qos_at(r, 2)?,
                retain: true,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    drop(st);
    tx.finish()?;

    let sessions = sessions
        .into_values()
        .map(|mut s| {
            // Sorted here rather than in SQL: message numbers are u64 and stored as i64.
            s.subscriptions.sort();
            s.queue.sort_by_key(|m| m.id);
            s.unreleased.sort_unstable();
            s
        })
        .collect();
    Ok((sessions, retained))
}

fn session(
    sessions: &mut BTreeMap<SessionKey, StoredSession>,
    key: SessionKey,
) -> &mut StoredSession {
    sessions
        .entry(key.clone())
        .or_insert_with(|| StoredSession {
            key,
            subscriptions: Vec::new(),
            queue: Vec::new(),
            unreleased: Vec::new(),
        })
}

fn key_at(r: &Row<'_>) -> rusqlite::Result<SessionKey> {
    let role = match r.get_ref(0)?.as_str()? {
        "device" => Role::Device,
        "service" => Role::Service,
        "gateway" => Role::Gateway,
        "internal" => Role::Internal,
        other => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                0,
                Type::Text,
                format!("unknown session role {other:?}").into(),
            ))
        }
    };
    let instance: String = r.get(2)?;
    Ok(SessionKey {
        role,
        id: r.get(1)?,
        instance: (!instance.is_empty()).then_some(instance),
    })
}

fn qos_at(r: &Row<'_>, idx: usize) -> rusqlite::Result<QoS> {
    let v: u8 = r.get(idx)?;
    QoS::from_u8(v).ok_or(rusqlite::Error::IntegralValueOutOfRange(idx, v.into()))
}

/// A reference model of the ops, and helpers shared by this module's and the writer's tests.
#[cfg(test)]
pub(super) mod model {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use bytes::Bytes;
    use fleet_mqtt::{Message, QoS, Role, SessionKey, StoreOp, StoredMessage, StoredSession};

    /// One session as the model keeps it.
    #[derive(Debug, Default, Clone)]
    struct Session {
        subscriptions: BTreeMap<String, QoS>,
        queue: BTreeMap<u64, (Message, bool)>,
        unreleased: BTreeSet<u16>,
    }

    /// What the ops say the store holds, kept in plain maps.
    #[derive(Debug, Default, Clone)]
    pub(in crate::store) struct Model {
        sessions: BTreeMap<SessionKey, Session>,
        retained: BTreeMap<String, Message>,
    }

    impl Model {
        pub(in crate::store) fn apply(&mut self, op: &StoreOp) {
            match op {
                StoreOp::SessionReset {
                    key,
                    persistent: true,
                } => {
                    self.sessions.insert(key.clone(), Session::default());
                }
                StoreOp::SessionReset {
                    key,
                    persistent: false,
                }
                | StoreOp::SessionExpired { key } => {
                    self.sessions.remove(key);
                }
                StoreOp::Subscribed { key, filter, qos } => {
                    self.session(key).subscriptions.insert(filter.clone(), *qos);
                }
                StoreOp::Unsubscribed { key, filter } => {
                    if let Some(s) = self.sessions.get_mut(key) {
                        s.subscriptions.remove(filter);
                    }
                }
                StoreOp::Enqueued { key, id, message } => {
                    self.session(key)
                        .queue
                        .insert(*id, (message.clone(), false));
                }
                StoreOp::Released { key, id } => {
                    if let Some((_, released)) =
                        self.sessions.get_mut(key).and_then(|s| s.queue.get_mut(id))
                    {
                        *released = true;
                    }
                }
                StoreOp::Dequeued { key, id } => {
                    if let Some(s) = self.sessions.get_mut(key) {
                        s.queue.remove(id);
                    }
                }
                StoreOp::Qos2Received { key, packet_id } => {
                    self.session(key).unreleased.insert(*packet_id);
                }
                StoreOp::Qos2Released { key, packet_id } => {
                    if let Some(s) = self.sessions.get_mut(key) {
                        s.unreleased.remove(packet_id);
                    }
                }
                StoreOp::Retained {
                    topic,
                    message: Some(m),
                } => {
                    let m = Message {
                        topic: Arc::from(topic.as_str()),
                        retain: true,
                        ..m.clone()
                    };
                    self.retained.insert(topic.clone(), m);
                }
                StoreOp::Retained {
                    topic,
                    message: None,
                } => {
                    self.retained.remove(topic);
                }
            }
        }

        fn session(&mut self, key: &SessionKey) -> &mut Session {
            self.sessions.entry(key.clone()).or_default()
        }

        /// What `load` must give back.
        pub(in crate::store) fn expected(&self) -> (Vec<StoredSession>, Vec<Message>) {
            let sessions = self
                .sessions
                .iter()
                .map(|(key, s)| StoredSession {
                    key: key.clone(),
                    subscriptions: s
                        .subscriptions
                        .iter()
                        .map(|(f, q)| (f.clone(), *q))
                        .collect(),
                    queue: s
                        .queue
                        .iter()
                        .map(|(id, (message, released))| StoredMessage {
                            id: *id,
                            message: message.clone(),
                            released: *released,
                        })
                        .collect(),
                    unreleased: s.unreleased.iter().copied().collect(),
                })
                .collect();
            (sessions, self.retained.values().cloned().collect())
        }
    }

    pub(in crate::store) fn key(role: Role, id: &str, instance: Option<&str>) -> SessionKey {
        SessionKey {
            role,
            id: id.into(),
            instance: instance.map(Into::into),
        }
    }

    pub(in crate::store) fn msg(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> Message {
        Message {
            topic: Arc::from(topic),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::model::{key, msg, Model};
    use super::*;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in(dir.path()).unwrap();
        (dir, store)
    }

    /// Applies `ops` (numbered from 1) as one transaction.
    fn write(store: &mut Store, ops: &[StoreOp]) -> Result<(), StoreError> {
        let numbered: Vec<_> = (1..).zip(ops.iter().cloned()).collect();
        store.write(|tx| apply(tx, &numbered))
    }

    /// Applies `ops` to the store and the model and checks that `load` agrees with the model.
    fn check(store: &mut Store, model: &mut Model, ops: &[StoreOp]) {
        write(store, ops).unwrap();
        ops.iter().for_each(|op| model.apply(op));
        assert_eq!(store.load_sessions().unwrap(), model.expected());
    }

    fn dev() -> SessionKey {
        key(Role::Device, "dev-1", None)
    }

    #[test]
    fn every_op_round_trips_through_apply_and_load() {
        let (_dir, mut s) = open();
        let mut m = Model::default();
        assert_eq!(s.load_sessions().unwrap(), (vec![], vec![]));
        let k = dev();
        let reset = StoreOp::SessionReset {
            key: k.clone(),
            persistent: true,
        };
        check(&mut s, &mut m, std::slice::from_ref(&reset));
        // An empty persistent session is still a session (CONNACK says "session present").
        let (sessions, _) = s.load_sessions().unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].key, k);

        let sub = |filter: &str, qos| StoreOp::Subscribed {
            key: k.clone(),
            filter: filter.into(),
            qos,
        };
        check(&mut s, &mut m, &[sub("a/#", QoS::AtLeastOnce)]);
        check(&mut s, &mut m, &[sub("b/+", QoS::AtMostOnce)]);
        // Re-subscribing changes the granted QoS.
        check(&mut s, &mut m, &[sub("a/#", QoS::ExactlyOnce)]);
        check(
            &mut s,
            &mut m,
            &[StoreOp::Unsubscribed {
                key: k.clone(),
                filter: "b/+".into(),
            }],
        );

        let enq = |id, payload: &[u8], qos, retain| StoreOp::Enqueued {
            key: k.clone(),
            id,
            message: msg("a/1", payload, qos, retain),
        };
        // Numbers past i64::MAX come back in number order, after the small ones, whatever
        // the order they were written in.
        check(&mut s, &mut m, &[enq(1 << 63, b"", QoS::AtMostOnce, false)]);
        check(&mut s, &mut m, &[enq(7, b"x", QoS::ExactlyOnce, false)]);
        check(
            &mut s,
            &mut m,
            &[enq(8, &[0, 255, 1], QoS::AtLeastOnce, true)],
        );
        check(
            &mut s,
            &mut m,
            &[StoreOp::Released {
                key: k.clone(),
                id: 7,
            }],
        );
        check(
            &mut s,
            &mut m,
            &[StoreOp::Dequeued {
                key: k.clone(),
                id: 8,
            }],
        );
        check(
            &mut s,
            &mut m,
            &[
                StoreOp::Qos2Received {
                    key: k.clone(),
                    packet_id: 65535,
                },
                StoreOp::Qos2Received {
                    key: k.clone(),
                    packet_id: 3,
                },
            ],
        );
        check(
            &mut s,
            &mut m,
            &[StoreOp::Qos2Released {
                key: k.clone(),
                packet_id: 65535,
            }],
        );
        let retained = |topic: &str, m| StoreOp::Retained {
            topic: topic.into(),
            message: m,
        };
        check(
            &mut s,
            &mut m,
            &[retained(
                "r/1",
                Some(msg("r/1", b"one", QoS::AtLeastOnce, true)),
            )],
        );
        check(
            &mut s,
            &mut m,
            &[retained(
                "r/2",
                Some(msg("r/2", b"two", QoS::AtMostOnce, true)),
            )],
        );
        // Replacing, then deleting.
        check(
            &mut s,
            &mut m,
            &[retained(
                "r/1",
                Some(msg("r/1", b"uno", QoS::ExactlyOnce, true)),
            )],
        );
        check(&mut s, &mut m, &[retained("r/2", None)]);

        // The state, spelled out once (the model could share a mistake with the store).
        let (sessions, retained) = s.load_sessions().unwrap();
        assert_eq!(
            sessions,
            vec![StoredSession {
                key: k.clone(),
                subscriptions: vec![("a/#".into(), QoS::ExactlyOnce)],
                queue: vec![
                    StoredMessage {
                        id: 7,
                        message: msg("a/1", b"x", QoS::ExactlyOnce, false),
                        released: true,
                    },
                    StoredMessage {
                        id: 1 << 63,
                        message: msg("a/1", b"", QoS::AtMostOnce, false),
                        released: false,
                    },
                ],
                unreleased: vec![3],
            }]
        );
        assert_eq!(retained, vec![msg("r/1", b"uno", QoS::ExactlyOnce, true)]);
        // Everything outlives the connection.
        let path = s.path().to_owned();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load_sessions().unwrap(), m.expected());
    }

    #[test]
    fn a_session_reset_forgets_only_its_own_key_and_keeps_or_removes_the_session() {
        let (_dir, mut s) = open();
        let mut m = Model::default();
        // Three identities that a client id alone could confuse, and one more device.
        let keys = [
            dev(),
            key(Role::Device, "svc-1:a", None),
            key(Role::Service, "svc-1", Some("a")),
            key(Role::Service, "svc-1", None),
        ];
        let fill: Vec<StoreOp> = keys
            .iter()
            .flat_map(|k| {
                [
                    StoreOp::SessionReset {
                        key: k.clone(),
                        persistent: true,
                    },
                    StoreOp::Subscribed {
                        key: k.clone(),
                        filter: "t/#".into(),
                        qos: QoS::AtLeastOnce,
                    },
                    StoreOp::Enqueued {
                        key: k.clone(),
                        id: 1,
                        message: msg("t/1", b"p", QoS::AtLeastOnce, false),
                    },
                    StoreOp::Qos2Received {
                        key: k.clone(),
                        packet_id: 9,
                    },
                ]
            })
            .collect();
        check(&mut s, &mut m, &fill);
        assert_eq!(s.load_sessions().unwrap().0.len(), 4);

        // Persistent again: the session stays, empty; the others keep everything.
        check(
            &mut s,
            &mut m,
            &[StoreOp::SessionReset {
                key: keys[1].clone(),
                persistent: true,
            }],
        );
        let (sessions, _) = s.load_sessions().unwrap();
        let emptied: Vec<_> = sessions
            .iter()
            .filter(|x| x.subscriptions.is_empty() && x.queue.is_empty() && x.unreleased.is_empty())
            .map(|x| x.key.clone())
            .collect();
        assert_eq!((sessions.len(), emptied), (4, vec![keys[1].clone()]));

        // A clean session replacing it: gone entirely.
        check(
            &mut s,
            &mut m,
            &[StoreOp::SessionReset {
                key: keys[2].clone(),
                persistent: false,
            }],
        );
        // Expired: gone too.
        check(
            &mut s,
            &mut m,
            &[StoreOp::SessionExpired {
                key: keys[3].clone(),
            }],
        );
        let left: Vec<_> = s
            .load_sessions()
            .unwrap()
            .0
            .into_iter()
            .map(|x| (x.key, x.queue.len()))
            .collect();
        assert_eq!(left, vec![(keys[0].clone(), 1), (keys[1].clone(), 0)]);
    }

    #[test]
    fn ops_on_missing_rows_change_nothing_and_do_not_fail() {
        let (_dir, mut s) = open();
        let mut m = Model::default();
        let k = dev();
        let stranger = key(Role::Gateway, "gw-9", None);
        check(
            &mut s,
            &mut m,
            &[
                StoreOp::SessionReset {
                    key: k.clone(),
                    persistent: true,
                },
                StoreOp::Enqueued {
                    key: k.clone(),
                    id: 1,
                    message: msg("t", b"p", QoS::AtLeastOnce, false),
                },
            ],
        );
        let before = s.load_sessions().unwrap();
        let noise = [
            StoreOp::Dequeued {
                key: k.clone(),
                id: 2,
            },
            StoreOp::Released {
                key: k.clone(),
                id: 2,
            },
            StoreOp::Unsubscribed {
                key: k.clone(),
                filter: "never".into(),
            },
            StoreOp::Qos2Released {
                key: k.clone(),
                packet_id: 1,
            },
            StoreOp::Dequeued {
                key: stranger.clone(),
                id: 1,
            },
            StoreOp::Unsubscribed {
                key: stranger.clone(),
                filter: "t".into(),
            },
            StoreOp::SessionExpired {
                key: stranger.clone(),
            },
            StoreOp::SessionReset {
                key: stranger,
                persistent: false,
            },
            StoreOp::Retained {
                topic: "none".into(),
                message: None,
            },
        ];
        check(&mut s, &mut m, &noise);
        // Applying the whole history again is harmless too.
        check(&mut s, &mut m, &noise);
        assert_eq!(s.load_sessions().unwrap(), before);
    }

    #[test]
    fn a_write_for_a_session_never_announced_creates_it() {
        let (_dir, mut s) = open();
        let k = key(Role::Service, "svc-2", Some("i"));
        let op = StoreOp::Subscribed {
            key: k.clone(),
            filter: "x".into(),
            qos: QoS::AtMostOnce,
        };
        write(&mut s, &[op]).unwrap();
        let (sessions, _) = s.load_sessions().unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].key, k);
        assert_eq!(
            sessions[0].subscriptions,
            vec![("x".into(), QoS::AtMostOnce)]
        );
    }

    #[test]
    fn a_batch_is_all_or_nothing() {
        let (_dir, mut s) = open();
        let mut m = Model::default();
        let k = dev();
        check(
            &mut s,
            &mut m,
            &[StoreOp::Subscribed {
                key: k.clone(),
                filter: "keep".into(),
                qos: QoS::AtLeastOnce,
            }],
        );
        let committed = s.load_sessions().unwrap();
        let batch = |topic: &str| {
            vec![
                StoreOp::Subscribed {
                    key: k.clone(),
                    filter: "lost".into(),
                    qos: QoS::AtLeastOnce,
                },
                StoreOp::Retained {
                    topic: "r".into(),
                    message: Some(msg("r", b"v", QoS::AtLeastOnce, true)),
                },
                StoreOp::Enqueued {
                    key: k.clone(),
                    id: 1,
                    message: msg(topic, b"p", QoS::AtLeastOnce, false),
                },
                StoreOp::SessionReset {
                    key: k.clone(),
                    persistent: true,
                },
            ]
        };

        // The transaction's owner gives up after every op went in (as when it is dropped
        // before its commit): nothing of it is visible.
        let numbered: Vec<_> = (1..).zip(batch("t")).collect();
        let r: Result<(), StoreError> = s.write(|tx| {
            apply(tx, &numbered)?;
            Err(StoreError::Task("stopped before the commit".into()))
        });
        assert!(r.is_err());
        assert_eq!(s.load_sessions().unwrap(), committed);

        // An op that SQLite refuses half-way through the batch: the error names the store
        // file, and the ops before it in the batch are not visible either.
        s.conn
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON mqtt_queue WHEN NEW.topic = 'refused'
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            )
            .unwrap();
        let e = write(&mut s, &batch("refused")).unwrap_err();
        assert!(e.to_string().contains("refused by the test"), "{e}");
        assert!(e.to_string().contains("gateway.db"), "{e}");
        assert_eq!(s.load_sessions().unwrap(), committed);

        // The same batch without the refused op commits whole.
        check(&mut s, &mut m, &batch("t"));
    }

    #[test]
    fn every_write_reaches_its_rows_through_a_key() {
        let (_dir, s) = open();
        for sql in sql::all() {
            let mut st = s
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let unbound = vec![rusqlite::types::Null; st.parameter_count()];
            let steps: Vec<String> = st
                .query_map(rusqlite::params_from_iter(unbound), |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            // Inserts have no plan; deletes and updates search by a key; a scan is a bug.
            let inserts = sql.trim_start().starts_with("INSERT");
            assert_eq!(steps.is_empty(), inserts, "{sql}: {steps:?}");
            for step in &steps {
                assert!(
                    step.starts_with("SEARCH")
                        && (step.contains("(topic=?)")
                            || step.contains("(role=? AND id=? AND instance=?")),
                    "{sql}: {step}"
                );
            }
        }
    }

    #[test]
    fn a_corrupt_row_is_an_error_not_a_panic() {
        let (_dir, mut s) = open();
        write(
            &mut s,
            &[StoreOp::SessionReset {
                key: dev(),
                persistent: true,
            }],
        )
        .unwrap();
        // Rows the schema's checks would refuse, written around them.
        s.conn
            .execute_batch(
                "PRAGMA ignore_check_constraints = ON;
                 UPDATE mqtt_sessions SET role = 'robot';",
            )
            .unwrap();
        let e = s.load_sessions().unwrap_err();
        assert!(e.to_string().contains("robot"), "{e}");
        s.conn
            .execute_batch(
                "UPDATE mqtt_sessions SET role = 'device';
                 INSERT INTO mqtt_retained (topic, payload, qos) VALUES ('r', x'00', 3);",
            )
            .unwrap();
        assert!(s.load_sessions().is_err());
    }

    const KEYS: [(Role, &str, Option<&str>); 4] = [
        (Role::Device, "svc-1:a", None),
        (Role::Service, "svc-1", Some("a")),
        (Role::Service, "svc-1", None),
        (Role::Internal, "bridge", None),
    ];

    fn arb_key() -> impl Strategy<Value = SessionKey> {
        (0..KEYS.len()).prop_map(|i| key(KEYS[i].0, KEYS[i].1, KEYS[i].2))
    }

    fn arb_qos() -> impl Strategy<Value = QoS> {
        prop::sample::select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
    }

    fn arb_msg_id() -> impl Strategy<Value = u64> {
        // Small numbers collide often; the large ones check the order past i64::MAX.
        prop::sample::select(vec![0, 1, 2, 3, 4, 1 << 63, u64::MAX])
    }

    fn arb_topic() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["t/1".to_string(), "t/2".into(), "u".into()])
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            arb_topic(),
            prop::collection::vec(any::<u8>(), 0..8),
            arb_qos(),
            any::<bool>(),
        )
            .prop_map(|(t, p, q, r)| msg(&t, &p, q, r))
    }

    fn arb_packet_id() -> impl Strategy<Value = u16> {
        prop::sample::select(vec![1u16, 2, 65535])
    }

    fn arb_op() -> impl Strategy<Value = StoreOp> {
        let filter = prop::sample::select(vec!["t/#".to_string(), "t/1".into(), "+".into()]);
        prop_oneof![
            1 => (arb_key(), any::<bool>())
                .prop_map(|(key, persistent)| StoreOp::SessionReset { key, persistent }),
            1 => arb_key().prop_map(|key| StoreOp::SessionExpired { key }),
            3 => (arb_key(), filter.clone(), arb_qos())
                .prop_map(|(key, filter, qos)| StoreOp::Subscribed { key, filter, qos }),
            2 => (arb_key(), filter).prop_map(|(key, filter)| StoreOp::Unsubscribed { key, filter }),
            4 => (arb_key(), arb_msg_id(), arb_message())
                .prop_map(|(key, id, message)| StoreOp::Enqueued { key, id, message }),
            2 => (arb_key(), arb_msg_id()).prop_map(|(key, id)| StoreOp::Released { key, id }),
            3 => (arb_key(), arb_msg_id()).prop_map(|(key, id)| StoreOp::Dequeued { key, id }),
            2 => (arb_key(), arb_packet_id())
                .prop_map(|(key, packet_id)| StoreOp::Qos2Received { key, packet_id }),
            2 => (arb_key(), arb_packet_id())
                .prop_map(|(key, packet_id)| StoreOp::Qos2Released { key, packet_id }),
            3 => (arb_topic(), proptest::option::of(arb_message()))
                .prop_map(|(topic, message)| StoreOp::Retained { topic, message }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any sequence of ops, cut into transactions anywhere, leaves what a plain in-memory
        /// model of the ops' documentation holds, after every transaction and after reopening.
        #[test]
        fn the_store_agrees_with_a_model_of_the_ops(
            batches in prop::collection::vec(prop::collection::vec(arb_op(), 0..12), 1..8),
        ) {
            let (_dir, mut s) = open();
            // Durability is not the subject here; syncing every case would only be slow.
            s.conn.execute_batch("PRAGMA synchronous = OFF").unwrap();
            let mut m = Model::default();
            let mut seq = 0;
            for batch in &batches {
                let numbered: Vec<_> = batch
                    .iter()
                    .map(|op| {
                        seq += 1;
                        (seq, op.clone())
                    })
                    .collect();
                s.write(|tx| apply(tx, &numbered)).unwrap();
                batch.iter().for_each(|op| m.apply(op));
                prop_assert_eq!(s.load_sessions().unwrap(), m.expected());
            }
            let path = s.path().to_owned();
            drop(s);
            prop_assert_eq!(Store::open(&path).unwrap().load_sessions().unwrap(), m.expected());
        }
    }
}
