//! Schema migrations. Each entry moves the schema from version `i` to `i + 1`; entries are
//! never edited once released, only appended.

use std::path::Path;

use rusqlite::Connection;

use super::{err, StoreError};

/// The migrations, in order. Version N is reached after applying the first N.
const MIGRATIONS: &[&str] = &[
    // 1: the status registry: last known report and presence per device.
    "CREATE TABLE device_state (
        device_id        TEXT PRIMARY KEY NOT NULL,
        status_sequence  INTEGER,            -- StatusReport.sequence of the stored report
        status           BLOB,               -- the StatusReport as received (protobuf)
        status_at_ms     INTEGER,            -- when the gateway stored it
        presence         BLOB,               -- the last Presence (protobuf)
        presence_at_ms   INTEGER
    ) STRICT;",
    // 2: the command service's table, and what the registry learns about each device.
    "ALTER TABLE device_state ADD COLUMN device_class TEXT;
     ALTER TABLE device_state ADD COLUMN reports_stored INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX device_state_class ON device_state (device_class);
     CREATE TABLE commands (
        device_id      TEXT NOT NULL,
        command_id     TEXT NOT NULL,
        name           TEXT NOT NULL,
        payload        BLOB NOT NULL,
        issued_by      TEXT NOT NULL,
        issued_at_ms   INTEGER NOT NULL,
        expires_at_ms  INTEGER NOT NULL,    -- 0: never
        attempts       INTEGER NOT NULL DEFAULT 0,
        state          INTEGER NOT NULL,    -- fleet.v1.CommandState
        result         BLOB,                -- the CommandResult (protobuf), once there is one
        updated_at_ms  INTEGER NOT NULL,
        PRIMARY KEY (device_id, command_id)
    ) STRICT;
    -- Open commands (PENDING = 1, DELIVERED = 2) by device and by expiry.
    CREATE INDEX commands_open ON commands (device_id) WHERE state IN (1, 2);
    CREATE INDEX commands_expiry ON commands (expires_at_ms) WHERE state IN (1, 2);
    CREATE INDEX commands_id ON commands (command_id);",
    // 3: the firmware cache: content-addressed images and, while an image is incomplete, which
    // chunks are on disk (a row per chunk, written after the chunk's bytes are synced).
    "CREATE TABLE images (
        sha256         TEXT PRIMARY KEY NOT NULL,   -- lowercase hex of the whole image
        size           INTEGER NOT NULL,
        chunk_size     INTEGER NOT NULL,
        chunk_count    INTEGER NOT NULL,
        merkle_root    BLOB NOT NULL,
        complete       INTEGER NOT NULL DEFAULT 0,
        created_at_ms  INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE image_chunks (
        sha256  TEXT NOT NULL REFERENCES images (sha256) ON DELETE CASCADE,
        idx     INTEGER NOT NULL,
        digest  BLOB NOT NULL,                      -- SHA-256 of the chunk, for proofs
        PRIMARY KEY (sha256, idx)
    ) STRICT, WITHOUT ROWID;",
    // 4: updates (the signed manifest exactly as received), their campaigns and per-device
    // progress. Campaign and target records are fleet.v1 CampaignRecord / TargetRecord
    // (protobuf), with the columns the gateway looks things up by beside them.
    "CREATE TABLE updates (
        update_id        TEXT PRIMARY KEY NOT NULL,
        signed_manifest  BLOB NOT NULL,               -- SignedManifest as received
        created_by       TEXT NOT NULL,
        created_at_ms    INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE campaigns (
        update_id  TEXT PRIMARY KEY NOT NULL REFERENCES updates (update_id),
        state      INTEGER NOT NULL,                  -- fleet.v1.CampaignState
        record     BLOB NOT NULL                      -- fleet.v1.CampaignRecord
    ) STRICT;
    CREATE TABLE update_targets (
        update_id  TEXT NOT NULL REFERENCES campaigns (update_id),
        device_id  TEXT NOT NULL,
        position   INTEGER NOT NULL,                  -- rollout order
        record     BLOB NOT NULL,                     -- fleet.v1.TargetRecord
        PRIMARY KEY (update_id, device_id)
    ) STRICT, WITHOUT ROWID;",
    // 5: the bridge's store-and-forward queue: every message bound upstream, in order, until
    // the upstream broker acknowledges it.
    "CREATE TABLE uplink_queue (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT,
        topic          TEXT NOT NULL,               -- local topic (mapped upstream when sent)
        payload        BLOB NOT NULL,
        enqueued_at_ms INTEGER NOT NULL
    ) STRICT;",
    // 6: one row the health endpoint rewrites to prove the file takes writes.
    "CREATE TABLE health_probe (
        id           INTEGER PRIMARY KEY CHECK (id = 1),
        probed_at_ms INTEGER NOT NULL
    ) STRICT;",
    // 7: the MQTT core's durable state (module `sessions`): persistent (clean session 0)
    // sessions keyed by identity, with their subscriptions, queued messages and incoming QoS 2
    // packet ids awaiting PUBREL, and the retained messages. Every key is the whole identity
    // (role, id, instance; instance '' when the session has none) so that each write of the
    // engine is one indexed single-row write. Queue and retained rows keep their rowid: their
    // payloads can be large and should stay out of the key's b-tree.
    "CREATE TABLE mqtt_sessions (
        role      TEXT NOT NULL CHECK (role IN ('device', 'service', 'gateway', 'internal')),
        id        TEXT NOT NULL,
        instance  TEXT NOT NULL,                      -- '' for none
        PRIMARY KEY (role, id, instance)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE mqtt_subscriptions (
        role      TEXT NOT NULL,
        id        TEXT NOT NULL,
        instance  TEXT NOT NULL,
        filter    TEXT NOT NULL,
        qos       INTEGER NOT NULL CHECK (qos BETWEEN 0 AND 2),   -- granted
        PRIMARY KEY (role, id, instance, filter)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE mqtt_queue (
        role      TEXT NOT NULL,
        id        TEXT NOT NULL,
        instance  TEXT NOT NULL,
        msg_id    INTEGER NOT NULL,                   -- the session's message number
        topic     TEXT NOT NULL,
        payload   BLOB NOT NULL,
        qos       INTEGER NOT NULL CHECK (qos BETWEEN 0 AND 2),   -- as delivered
        retain    INTEGER NOT NULL CHECK (retain IN (0, 1)),
        released  INTEGER NOT NULL DEFAULT 0 CHECK (released IN (0, 1)),  -- PUBREL sent
        PRIMARY KEY (role, id, instance, msg_id)
    ) STRICT;
    CREATE TABLE mqtt_qos2_in (
        role       TEXT NOT NULL,
        id         TEXT NOT NULL,
        instance   TEXT NOT NULL,
        packet_id  INTEGER NOT NULL CHECK (packet_id BETWEEN 0 AND 65535),
        PRIMARY KEY (role, id, instance, packet_id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE mqtt_retained (
        topic    TEXT PRIMARY KEY NOT NULL,
        payload  BLOB NOT NULL,
        qos      INTEGER NOT NULL CHECK (qos BETWEEN 0 AND 2)
    ) STRICT;",
    // 8: signed commands. The gateway stores the Command bytes exactly as the issuing service
    // signed them and the signatures (an encoded SignedCommand holding only its `signatures`),
    // and holds a command until its not-before time. Rows of older versions have neither
    // (NULL): they are delivered unsigned, as they were accepted.
    "ALTER TABLE commands ADD COLUMN command BLOB;
     ALTER TABLE commands ADD COLUMN signatures BLOB;
     ALTER TABLE commands ADD COLUMN not_before_ms INTEGER NOT NULL DEFAULT 0;
     CREATE INDEX commands_held ON commands (not_before_ms) WHERE state = 1 AND not_before_ms != 0;",
    // 9: the roots of trust the gateway distributes (the newest few, as received), and each
    // device's last trust report.
    "CREATE TABLE trust_roots (
        version      INTEGER PRIMARY KEY NOT NULL,  -- Root.version
        signed_root  BLOB NOT NULL,                 -- the SignedRoot exactly as received
        added_at_ms  INTEGER NOT NULL
    ) STRICT;
    ALTER TABLE device_state ADD COLUMN trust BLOB;            -- the last TrustReport
    ALTER TABLE device_state ADD COLUMN trust_at_ms INTEGER;",
];

/// The newest schema version this build knows.
pub(super) fn latest() -> u32 {
    // A handful of migrations: always fits.
    MIGRATIONS.len() as u32
}

pub(super) fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Applies every migration the file lacks, each in its own transaction together with the
/// version bump, so a crash leaves the file at a whole version.
pub(super) fn apply(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found = version(conn).map_err(|e| err(path, e))?;
    let known = latest();
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| err(path, e))?;
        tx.execute_batch(sql).map_err(|e| err(path, e))?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(|e| err(path, e))?;
        tx.commit().map_err(|e| err(path, e))?;
    }
    Ok(())
}
