#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use proptest::prelude::*;

use super::*;

fn backoff() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        floor: Duration::from_millis(50),
        ..BackoffConfig::default()
    }
}

fn config() -> MachineConfig {
    MachineConfig {
        backoff: backoff(),
        upstreams: 1,
        presence_interval: Duration::from_secs(10),
        presence_refresh: Duration::from_secs(60),
    }
}

/// The packet id the unit tests give the presence announced on a connection.
const PRESENCE_PKID: u16 = 9_999;

/// Connects `m`; the client numbers the presence it announces first, and its PUBACK comes.
fn connect(m: &mut Machine, now: Instant, session_present: bool) {
    m.connected(now, session_present);
    m.sent(PRESENCE_PKID);
    assert!(m.puback(PRESENCE_PKID));
}

fn row(seq: i64) -> Row {
    Row {
        seq,
        len: seq as usize,
    }
}

fn drain(m: &mut Machine) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

/// The read among `actions`: (read, after, room).
fn read_of(actions: &[Action]) -> (u64, i64, usize) {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Read { read, after, room } => Some((*read, *after, *room)),
            _ => None,
        })
        .expect("a read")
}

fn published(actions: &[Action]) -> Vec<i64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish(r) => Some(r.seq),
            _ => None,
        })
        .collect()
}

fn removals(actions: &[Action]) -> Vec<Vec<i64>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// A connected machine that has read and handed over rows `seqs`, numbered 1, 2, ...
fn with_inflight(now: Instant, seqs: &[i64]) -> Machine {
    let mut m = Machine::new(config());
    connect(&mut m, now, false);
    let (read, after, room) = read_of(&drain(&mut m));
    assert_eq!((after, room), (0, WINDOW));
    let rows: Vec<Row> = seqs.iter().copied().map(row).collect();
    m.rows(read, &rows);
    assert_eq!(published(&drain(&mut m)), seqs);
    for i in 0..seqs.len() {
        m.sent(u16::try_from(i + 1).unwrap());
    }
    m
}

#[test]
fn a_refused_row_is_never_handed_over_and_leaves_the_queue_undelivered() {
    let now = Instant::now();
    let mut m = Machine::new(config());
    connect(&mut m, now, false);
    let (read, _, _) = read_of(&drain(&mut m));
    assert_eq!(m.refused(&[2]), 1);
    m.rows(read, &[row(1), row(2), row(3)]);
    assert_eq!(published(&drain(&mut m)), [1, 3]);
    // Read again before its removal (a stale read): not counted twice.
    assert_eq!(m.refused(&[2]), 0);

    // A reconnect before the removal starts from the head and still skips it.
    m.disconnected(now, 0);
    connect(&mut m, now, false);
    let a = drain(&mut m);
    // The connection flushed the refused row's removal.
    let mut removed: Vec<i64> = removals(&a).concat();
    assert_eq!(removed, [2]);
    let (read, after, _) = read_of(&a);
    assert_eq!(after, 0);
    m.rows(read, &[row(1), row(2), row(3)]);
    assert_eq!(published(&drain(&mut m)), [1, 3]);
    m.sent(1);
    m.sent(2);
    assert!(m.puback(1));
    assert!(m.puback(2));
    m.tick(now);
    let a = drain(&mut m);
    let delivered: Vec<i64> = a
        .iter()
        .filter_map(|a| match a {
            Action::Delivered(r) => Some(r.seq),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, [1, 3]);
    removed.extend(removals(&a).concat());
    removed.sort_unstable();
    assert_eq!(removed, [1, 2, 3]);
    assert_eq!(m.unacknowledged(), 0);
}

#[test]
fn nothing_is_read_or_sent_while_disconnected() {
    let now = Instant::now();
    let mut m = Machine::new(config());
    m.queued();
    m.tick(now);
    assert_eq!(drain(&mut m), [Action::Housekeeping]);
}

#[test]
fn a_connection_reads_from_the_head_with_the_whole_window() {
    let now = Instant::now();
    let mut m = Machine::new(config());
    m.connected(now, true);
    let a = drain(&mut m);
    assert_eq!(
        a,
        [
            Action::Up {
                session_present: true
            },
            Action::Presence {
                online: true,
                counts: DeviceCounts::default()
            },
            Action::Read {
                read: 1,
                after: 0,
                room: WINDOW
            }
        ]
    );
    // One read at a time.
    m.queued();
    m.tick(now);
    assert_eq!(drain(&mut m), [Action::Housekeeping]);
}

#[test]
fn a_puback_removes_its_row_in_the_next_batch_and_the_window_reopens() {
    let now = Instant::now();
    let mut m = with_inflight(now, &[3, 5, 9]);
    assert!(m.puback(2));
    let a = drain(&mut m);
    assert_eq!(a[0], Action::Delivered(row(5)));
    // The window had room: reading past the last row handed over.
    assert_eq!(read_of(&a).1, 9);
    m.tick(now);
    assert_eq!(removals(&drain(&mut m)), [vec![5]]);
    assert_eq!(m.unacknowledged(), 2);
}

#[test]
fn a_puback_for_an_unknown_packet_id_is_ignored() {
    let now = Instant::now();
    let mut m = with_inflight(now, &[1]);
    assert!(!m.puback(7));
    m.tick(now);
    assert!(removals(&drain(&mut m)).is_empty());
    // The same id twice: the second is unknown.
    assert!(m.puback(1));
    assert!(!m.puback(1));
}

#[test]
fn a_puback_from_the_previous_connection_is_ignored_after_a_reconnect() {
    let now = Instant::now();
    let mut m = with_inflight(now, &[1, 2]);
    m.disconnected(now, 0);
    connect(&mut m, now + Duration::from_secs(1), true);
    drain(&mut m);
    assert!(!m.puback(1));
    assert!(!m.puback(2));
    m.tick(now);
    assert!(removals(&drain(&mut m)).is_empty());
}

#[test]
fn a_packet_id_given_before_its_row_was_handed_over_binds_nothing() {
    let now = Instant::now();
    let mut m = Machine::new(config());
    connect(&mut m, now, false);
    drain(&mut m);
    m.sent(4);
    assert!(!m.puback(4));
}

#[test]
fn the_window_caps_rows_in_flight() {
    let now = Instant::now();
    let seqs: Vec<i64> = (1..=100).collect();
    let mut m = Machine::new(config());
    connect(&mut m, now, false);
    let (read, _, room) = read_of(&drain(&mut m));
    let rows: Vec<Row> = seqs.iter().copied().map(row).collect();
    // A reader returning more than asked for still fills only the window.
    m.rows(read, &rows);
    let a = drain(&mut m);
    assert_eq!(published(&a).len(), room);
    assert_eq!(m.unacknowledged(), WINDOW);
    m.tick(now);
    assert!(!drain(&mut m)
        .iter()
        .any(|a| matches!(a, Action::Read { .. })));
}

#[test]
fn a_reconnect_sends_again_from_the_head_skipping_what_was_acknowledged() {
    let now = Instant::now();
    let mut m = with_inflight(now, &[1, 2, 3]);
    assert!(m.puback(2));
    drain(&mut m);
    m.disconnected(now, 0);
    let a = drain(&mut m);
    assert!(
        matches!(a[..], [Action::Down { was_up: true, .. }]),
        "{a:?}"
    );
    connect(&mut m, now + Duration::from_secs(1), true);
    let a = drain(&mut m);
    // Row 2 was acknowledged: removed before the read, never sent again.
    assert_eq!(removals(&a), [vec![2]]);
    let (read, after, _) = read_of(&a);
    assert_eq!(after, 0);
    m.rows(read, &[row(1), row(2), row(3)]);
    assert_eq!(published(&drain(&mut m)), [1, 3]);
    // Once its removal is confirmed, a row can no longer be read anyway.
    m.removed(&[2], true);
    assert!(m.done.is_empty());
}

#[test]
fn a_failed_removal_is_asked_again_and_the_row_is_not_sent_again_meanwhile() {
    let now = Instant::now();
    let mut m = with_inflight(now, &[1]);
    m.puback(1);
    m.tick(now);
    let a = drain(&mut m);
    assert_eq!(removals(&a), [vec![1]]);
    m.removed(&[1], false);
    m.disconnected(now, 0);
    connect(&mut m, now, true);
    let a = drain(&mut m);
    assert_eq!(removals(&a), [vec![1]]);
    let (read, ..) = read_of(&a);
    m.rows(read, &[row(1)]);
    assert!(published(&drain(&mut m)).is_empty());
}

#[test]
fn a_read_from_the_previous_connection_is_ignored() {
    let now = Instant::now();
    let mut m = Machine::new(config());
    connect(&mut m, now, false);
    let (old, ..) = read_of(&drain(&mut m));
    m.disconnected(now, 0);
    m.rows(old, &[row(1)]);
    connect(&mut m, now, false);
    let a = drain(&mut m);
    let (new, after, _) = read_of(&a);
    assert_ne!(old, new);
    assert_eq!(after, 0);
    m.rows(old, &[row(1)]);
    assert!(published(&drain(&mut m)).is_empty());
    m.rows(new, &[row(1)]);
    assert_eq!(published(&drain(&mut m)), [1]);
}

#[test]
fn a_refused_hand_over_is_read_again() {
    let now = Instant::now();
    let mut m = Machine::new(config());
    connect(&mut m, now, false);
    let (read, ..) = read_of(&drain(&mut m));
    m.rows(read, &[row(4), row(6), row(8)]);
    assert_eq!(m.poll_action(), Some(Action::Publish(row(4))));
    assert_eq!(m.poll_action(), Some(Action::Publish(row(6))));
    m.unsent(6);
    assert_eq!(drain(&mut m), []);
    assert_eq!(m.unacknowledged(), 1);
    m.tick(now);
    let (_, after, room) = read_of(&drain(&mut m));
    assert_eq!((after, room), (5, WINDOW - 1));
}

#[test]
fn a_read_that_filled_its_room_or_missed_new_rows_reads_on() {
    let now = Instant::now();
    let mut m = Machine::new(config());
    connect(&mut m, now, false);
    let (read, ..) = read_of(&drain(&mut m));
    // Short read, nothing queued meanwhile: wait for the next event.
    m.rows(read, &[row(1)]);
    assert_eq!(published(&drain(&mut m)), [1]);
    m.queued();
    let (read, after, _) = read_of(&drain(&mut m));
    assert_eq!(after, 1);
    // Rows queued while the read was out: read again at once.
    m.queued();
    assert_eq!(drain(&mut m), []);
    m.rows(read, &[]);
    assert_eq!(read_of(&drain(&mut m)).1, 1);
}

#[test]
fn acknowledgements_are_removed_in_batches() {
    let now = Instant::now();
    let mut m = Machine::new(config());
    connect(&mut m, now, false);
    let mut removed = Vec::new();
    let mut next = 1i64;
    let mut pkid = 0u16;
    while removed.is_empty() {
        let a = drain(&mut m);
        removed.extend(removals(&a));
        if let Some((read, ..)) = a.iter().find_map(|a| match a {
            Action::Read { read, after, room } => Some((*read, *after, *room)),
            _ => None,
        }) {
            let rows: Vec<Row> = (next..next + 8).map(row).collect();
            next += 8;
            m.rows(read, &rows);
            for _ in published(&drain(&mut m)) {
                pkid += 1;
                m.sent(pkid);
                m.puback(pkid);
            }
        }
    }
    assert_eq!(removed, [(1..=ACK_BATCH as i64).collect::<Vec<_>>()]);
}

#[test]
fn reconnects_back_off_and_housekeeping_runs_once_a_second() {
    let t0 = Instant::now();
    let mut m = Machine::new(config());
    let mut retry = Vec::new();
    for i in 0..6 {
        m.disconnected(t0 + Duration::from_secs(i), u64::MAX);
        match drain(&mut m)[..] {
            [Action::Down {
                retry_at, was_up, ..
            }] => {
                assert!(!was_up);
                retry.push(retry_at - (t0 + Duration::from_secs(i)));
            }
            ref a => panic!("{a:?}"),
        }
    }
    assert!(retry.windows(2).all(|w| w[0] <= w[1]), "{retry:?}");
    assert!(retry[0] >= Duration::from_millis(50));
    assert!(retry[5] <= Duration::from_secs(2));
    let hk = |m: &mut Machine, t| {
        m.tick(t);
        drain(m).contains(&Action::Housekeeping)
    };
    assert!(hk(&mut m, t0));
    assert!(!hk(&mut m, t0 + Duration::from_millis(500)));
    assert!(hk(&mut m, t0 + Duration::from_millis(1000)));
}

#[test]
fn every_address_is_tried_in_turn_and_a_switch_sends_again_from_the_head() {
    let t0 = Instant::now();
    let mut m = Machine::new(MachineConfig {
        upstreams: 3,
        ..config()
    });
    assert_eq!(m.upstream(), 0);
    let mut tried = vec![m.upstream()];
    for i in 0..6u64 {
        m.disconnected(t0 + Duration::from_secs(i), 0);
        match drain(&mut m)[..] {
            [Action::Down {
                upstream, switched, ..
            }] => {
                assert!(switched);
                assert_eq!(upstream, m.upstream());
                tried.push(upstream);
            }
            ref a => panic!("{a:?}"),
        }
    }
    assert_eq!(tried, [0, 1, 2, 0, 1, 2, 0]);
    // Rows unacknowledged on one address go again, from the head, to the next one.
    connect(&mut m, t0, false);
    let (read, ..) = read_of(&drain(&mut m));
    m.rows(read, &[row(1), row(2)]);
    assert_eq!(published(&drain(&mut m)), [1, 2]);
    m.sent(1);
    m.sent(2);
    assert!(m.puback(1));
    m.disconnected(t0, 0);
    assert_eq!(m.upstream(), 1);
    connect(&mut m, t0, false);
    let a = drain(&mut m);
    let (read, after, room) = read_of(&a);
    assert_eq!((after, room), (0, WINDOW));
    m.rows(read, &[row(1), row(2)]);
    assert_eq!(published(&drain(&mut m)), [2]);
}

#[test]
fn one_address_is_never_a_switch() {
    let mut m = Machine::new(config());
    m.disconnected(Instant::now(), 0);
    assert!(matches!(
        drain(&mut m)[..],
        [Action::Down {
            upstream: 0,
            switched: false,
            ..
        }]
    ));
}

fn presences(actions: &[Action]) -> Vec<(bool, DeviceCounts)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Presence { online, counts } => Some((*online, *counts)),
            _ => None,
        })
        .collect()
}

#[test]
fn presence_goes_out_on_connect_then_on_changes_at_most_once_an_interval() {
    let t0 = Instant::now();
    let counts = |known, online| DeviceCounts { known, online };
    let mut m = Machine::new(config());
    // Disconnected: nothing to announce yet.
    m.devices(t0, counts(2, 1));
    assert!(presences(&drain(&mut m)).is_empty());
    m.connected(t0, false);
    let a = drain(&mut m);
    assert_eq!(presences(&a), [(true, counts(2, 1))]);
    // The presence is numbered before the rows read after it, and its PUBACK is no row's.
    let (read, ..) = read_of(&a);
    m.rows(read, &[row(1)]);
    drain(&mut m);
    m.sent(1);
    m.sent(2);
    assert!(m.puback(1));
    assert_eq!(drain(&mut m), [Action::Announced { online: true }]);
    assert_eq!(m.unacknowledged(), 1);
    // Unchanged counts: nothing until the refresh is due (its own test is below).
    m.tick(t0 + Duration::from_secs(59));
    m.devices(t0 + Duration::from_secs(59), counts(2, 1));
    assert!(presences(&drain(&mut m)).is_empty());
    // A change within the interval waits for it; the latest counts go.
    let t1 = t0 + Duration::from_secs(61);
    m.devices(t1, counts(3, 2));
    assert_eq!(presences(&drain(&mut m)), [(true, counts(3, 2))]);
    m.devices(t1 + Duration::from_secs(1), counts(3, 3));
    m.devices(t1 + Duration::from_secs(2), counts(4, 3));
    m.tick(t1 + Duration::from_secs(9));
    assert!(presences(&drain(&mut m)).is_empty());
    m.tick(t1 + Duration::from_secs(10));
    assert_eq!(presences(&drain(&mut m)), [(true, counts(4, 3))]);
    // A refused hand-over is announced again after the interval.
    m.devices(t1 + Duration::from_secs(20), counts(5, 3));
    assert_eq!(presences(&drain(&mut m)), [(true, counts(5, 3))]);
    m.presence_unsent();
    m.tick(t1 + Duration::from_secs(21));
    assert!(presences(&drain(&mut m)).is_empty());
    m.tick(t1 + Duration::from_secs(30));
    assert_eq!(presences(&drain(&mut m)), [(true, counts(5, 3))]);
    // A new connection announces at once.
    m.disconnected(t1 + Duration::from_secs(31), 0);
    m.connected(t1 + Duration::from_secs(31), true);
    assert_eq!(presences(&drain(&mut m)), [(true, counts(5, 3))]);
}

#[test]
fn stopping_announces_offline_once_and_nothing_after() {
    let t0 = Instant::now();
    let mut m = Machine::new(config());
    assert!(!m.stop(t0), "nothing to announce while disconnected");
    let mut m = Machine::new(config());
    connect(&mut m, t0, false);
    drain(&mut m);
    assert!(m.stop(t0));
    let a = drain(&mut m);
    assert_eq!(presences(&a), [(false, DeviceCounts::default())]);
    m.sent(7);
    assert!(m.puback(7));
    assert_eq!(drain(&mut m), [Action::Announced { online: false }]);
    m.devices(
        t0 + Duration::from_secs(60),
        DeviceCounts {
            known: 1,
            online: 1,
        },
    );
    m.tick(t0 + Duration::from_secs(60));
    assert!(presences(&drain(&mut m)).is_empty());
}

#[test]
fn unchanged_presence_is_announced_again_once_per_refresh() {
    let t0 = Instant::now();
    let mut m = Machine::new(config());
    connect(&mut m, t0, true);
    drain(&mut m);
    m.tick(t0 + Duration::from_secs(59));
    assert!(presences(&drain(&mut m)).is_empty());
    m.tick(t0 + Duration::from_secs(60));
    assert_eq!(presences(&drain(&mut m)), [(true, DeviceCounts::default())]);
    m.tick(t0 + Duration::from_secs(119));
    assert!(presences(&drain(&mut m)).is_empty());
    m.tick(t0 + Duration::from_secs(120));
    assert_eq!(presences(&drain(&mut m)).len(), 1);
}

/// Ticks `m` every 50 ms (the driver's tick) from `from` for `span`; the times at which it
/// asked for the subscriptions again.
fn resubscribes(m: &mut Machine, from: Instant, span: Duration) -> Vec<Duration> {
    let mut asked = Vec::new();
    let mut t = Duration::ZERO;
    while t <= span {
        m.tick(from + t);
        if drain(m).contains(&Action::Resubscribe) {
            asked.push(t);
        }
        t += Duration::from_millis(50);
    }
    asked
}

#[test]
fn a_refused_subscription_is_asked_for_again_sooner_first_then_at_most_every_30_s() {
    let t0 = Instant::now();
    let mut m = Machine::new(config());
    connect(&mut m, t0, true);
    drain(&mut m);
    let mut now = t0;
    let mut waits = Vec::new();
    for _ in 0..8 {
        m.subscribe_refused(now);
        // A second refusal while one is pending changes nothing.
        m.subscribe_refused(now);
        let asked = resubscribes(&mut m, now, Duration::from_secs(40));
        assert_eq!(asked.len(), 1, "one request per refusal: {asked:?}");
        waits.push(asked[0].as_secs());
        now += asked[0];
    }
    assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
}

#[test]
fn a_refusal_is_forgotten_with_its_connection_and_the_next_starts_from_one_second() {
    let t0 = Instant::now();
    let mut m = Machine::new(config());
    // Refused while disconnected: nothing to ask for.
    m.subscribe_refused(t0);
    assert!(resubscribes(&mut m, t0, Duration::from_secs(40)).is_empty());
    connect(&mut m, t0, false);
    drain(&mut m);
    for _ in 0..3 {
        m.subscribe_refused(t0);
        let asked = resubscribes(&mut m, t0, Duration::from_secs(10));
        assert!(!asked.is_empty());
    }
    m.subscribe_refused(t0);
    m.disconnected(t0, 0);
    // The connection that was refused is gone; a new one subscribes anyway.
    assert!(resubscribes(&mut m, t0, Duration::from_secs(40)).is_empty());
    connect(&mut m, t0, true);
    drain(&mut m);
    m.subscribe_refused(t0);
    assert_eq!(
        resubscribes(&mut m, t0, Duration::from_secs(5)),
        [Duration::from_secs(1)]
    );
}

// ---- The model: a store queue, a client numbering in order, an upstream broker. ----

#[derive(Debug, Clone)]
enum Op {
    /// `n` rows queued locally.
    Enqueue(u8),
    /// The client numbers its oldest publish and writes it.
    ClientSends,
    /// The broker takes a publish; its PUBACK is lost when `lose`.
    BrokerTakes { lose: bool },
    /// A PUBACK reaches the client.
    AckArrives,
    /// A PUBACK from a previous connection reaches the client.
    StaleAck(usize),
    /// The oldest outstanding read completes (or fails).
    ReadDone { fail: bool },
    /// The oldest outstanding removal completes (or fails).
    RemoveDone { fail: bool },
    /// The next hand-over is refused by the client.
    RefuseNext,
    /// The connection drops.
    Drop,
    /// A connection attempt (when the machine allows one).
    Connect,
    /// Time passes.
    Tick(u16),
    /// The gateway is killed and restarted: the machine is rebuilt from the store alone.
    Crash,
    /// A connection attempt fails (when the machine allows one).
    AttemptFails,
    /// The device counts change.
    Devices(u8, u8),
    /// The broker refuses a downward subscription (answers the last SUBSCRIBE with a failure).
    SubscriptionRefused,
}

/// Upstream addresses in the model.
const UPSTREAMS: usize = 3;
/// The model's presence interval.
const PRESENCE_INTERVAL: Duration = Duration::from_secs(1);
/// The model's presence refresh.
const PRESENCE_REFRESH: Duration = Duration::from_secs(5);

fn model_config() -> MachineConfig {
    MachineConfig {
        backoff: backoff(),
        upstreams: UPSTREAMS,
        presence_interval: PRESENCE_INTERVAL,
        presence_refresh: PRESENCE_REFRESH,
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u8..6).prop_map(Op::Enqueue),
        6 => Just(Op::ClientSends),
        5 => prop::bool::weighted(0.1).prop_map(|lose| Op::BrokerTakes { lose }),
        5 => Just(Op::AckArrives),
        1 => (0usize..8).prop_map(Op::StaleAck),
        4 => (0u8..10).prop_map(|f| Op::ReadDone { fail: f == 0 }),
        3 => (0u8..10).prop_map(|f| Op::RemoveDone { fail: f == 0 }),
        1 => Just(Op::RefuseNext),
        1 => Just(Op::Drop),
        2 => Just(Op::Connect),
        2 => (1u16..1500).prop_map(Op::Tick),
        1 => Just(Op::Crash),
        1 => Just(Op::AttemptFails),
        2 => (0u8..4, 0u8..4).prop_map(|(k, o)| Op::Devices(k, o)),
        1 => Just(Op::SubscriptionRefused),
    ]
}

#[derive(Debug)]
struct Model {
    m: Machine,
    now: Instant,
    /// The store's queue: seq -> length.
    queue: BTreeMap<i64, usize>,
    next_seq: i64,
    all: Vec<i64>,
    reads: VecDeque<(u64, i64, usize)>,
    removes: VecDeque<Vec<i64>>,
    refuse_next: bool,
    /// Client: handed over, not yet numbered.
    client: VecDeque<i64>,
    next_pkid: u16,
    /// The truth of this connection: packet id -> row, until its PUBACK reaches the client.
    wire: HashMap<u16, i64>,
    to_broker: VecDeque<(u16, i64)>,
    to_client: VecDeque<u16>,
    /// Packet ids of earlier connections.
    old_pkids: Vec<u16>,
    connected: bool,
    retry_at: Option<Instant>,
    /// Rows handed over on this connection, in order.
    sent_here: Vec<i64>,
    /// Rows whose PUBACK reached the client on the connection that sent them.
    acked: HashSet<i64>,
    /// A PUBACK just handed to the machine: the row it must count.
    expect_delivered: Option<i64>,
    /// What the upstream broker received, in order.
    upstream: Vec<i64>,
    first_seen: HashSet<i64>,
    faults: usize,
    /// The current device counts.
    counts: DeviceCounts,
    /// Every presence handed to the client: (online, counts). In the client's and the wire's
    /// queues, presence `i` is `-(i + 1)`.
    presences: Vec<(bool, DeviceCounts)>,
    /// When presence was last handed over on this connection.
    presence_at: Option<Instant>,
    /// Presence the upstream broker received, in order.
    upstream_presence: Vec<(bool, DeviceCounts)>,
    /// A presence PUBACK just handed to the machine.
    expect_announced: Option<bool>,
    /// The address the model is connected to (or last tried).
    address: usize,
    /// The oldest refusal of a downward subscription on this connection not yet followed by
    /// a request for it again.
    refused_at: Option<Instant>,
}

/// Whether an entry of the client's or the wire's queues is a row (not presence).
fn is_row(seq: i64) -> bool {
    seq > 0
}

impl Model {
    fn new() -> Self {
        Model {
            m: Machine::new(model_config()),
            now: Instant::now(),
            queue: BTreeMap::new(),
            next_seq: 1,
            all: Vec::new(),
            reads: VecDeque::new(),
            removes: VecDeque::new(),
            refuse_next: false,
            client: VecDeque::new(),
            next_pkid: 0,
            wire: HashMap::new(),
            to_broker: VecDeque::new(),
            to_client: VecDeque::new(),
            old_pkids: Vec::new(),
            connected: false,
            retry_at: None,
            sent_here: Vec::new(),
            acked: HashSet::new(),
            expect_delivered: None,
            upstream: Vec::new(),
            first_seen: HashSet::new(),
            faults: 0,
            counts: DeviceCounts::default(),
            presences: Vec::new(),
            presence_at: None,
            upstream_presence: Vec::new(),
            expect_announced: None,
            address: 0,
            refused_at: None,
        }
    }

    /// Carries out the machine's actions and checks what it asks for.
    fn run(&mut self) -> Result<(), TestCaseError> {
        while let Some(a) = self.m.poll_action() {
            match a {
                Action::Read { read, after, room } => self.reads.push_back((read, after, room)),
                Action::Publish(r) => {
                    prop_assert!(self.connected, "a publish while disconnected");
                    if std::mem::take(&mut self.refuse_next) {
                        self.m.unsent(r.seq);
                        continue;
                    }
                    // (d) from the head, in order, nothing unacknowledged skipped.
                    prop_assert!(self.sent_here.last().is_none_or(|&l| l < r.seq));
                    for (&s, _) in self.queue.range(..r.seq) {
                        prop_assert!(
                            self.acked.contains(&s) || self.sent_here.contains(&s),
                            "row {} skipped before {}",
                            s,
                            r.seq
                        );
                    }
                    prop_assert_eq!(self.queue.get(&r.seq), Some(&r.len));
                    self.sent_here.push(r.seq);
                    self.client.push_back(r.seq);
                    // (b) the window, as the client and the wire see it.
                    let rows = self.client.iter().filter(|s| is_row(**s)).count()
                        + self.wire.values().filter(|s| is_row(**s)).count();
                    prop_assert!(rows <= WINDOW);
                }
                Action::Remove(seqs) => {
                    // (a) removed only after its PUBACK.
                    for s in &seqs {
                        prop_assert!(self.acked.contains(s), "row {} removed unacknowledged", s);
                    }
                    self.removes.push_back(seqs);
                }
                Action::Up { .. } => prop_assert!(self.connected),
                Action::Down {
                    retry_at,
                    upstream,
                    switched,
                    ..
                } => {
                    // (f) round robin: each failure moves to the next address.
                    prop_assert_eq!(upstream, (self.address + 1) % UPSTREAMS);
                    prop_assert!(switched);
                    self.address = upstream;
                    self.retry_at = Some(retry_at);
                }
                Action::Presence { online, counts } => {
                    prop_assert!(self.connected, "presence while disconnected");
                    prop_assert!(online);
                    prop_assert_eq!(counts, self.counts);
                    // (g) after a connection's first, at most one per interval.
                    if let Some(at) = self.presence_at {
                        prop_assert!(self.now >= at + PRESENCE_INTERVAL, "presence too soon");
                    }
                    self.presence_at = Some(self.now);
                    if std::mem::take(&mut self.refuse_next) {
                        self.m.presence_unsent();
                        continue;
                    }
                    self.presences.push((online, counts));
                    self.client.push_back(-(self.presences.len() as i64));
                }
                Action::Announced { online } => {
                    prop_assert_eq!(self.expect_announced.take(), Some(online));
                }
                Action::Delivered(r) => {
                    prop_assert_eq!(self.expect_delivered.take(), Some(r.seq));
                }
                Action::Housekeeping => {}
                Action::Resubscribe => {
                    // (i) asked for again only on the connection that was refused, and not
                    // before the shortest delay.
                    prop_assert!(
                        self.connected,
                        "a subscription asked for while disconnected"
                    );
                    let refused = self.refused_at.take();
                    prop_assert!(refused.is_some(), "a subscription asked for unrefused");
                    if let Some(at) = refused {
                        prop_assert!(self.now >= at + RESUBSCRIBE_MIN, "asked for again too soon");
                    }
                }
            }
            prop_assert!(self.m.unacknowledged() <= WINDOW);
        }
        Ok(())
    }

    fn drop_connection(&mut self) {
        self.refused_at = None;
        self.old_pkids.extend(self.wire.keys());
        self.client.clear();
        self.wire.clear();
        self.to_broker.clear();
        self.to_client.clear();
        self.connected = false;
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Enqueue(n) => {
                for _ in 0..n {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.queue.insert(seq, (seq % 7) as usize);
                    self.all.push(seq);
                }
                self.m.queued();
            }
            Op::ClientSends => {
                if let Some(seq) = self.client.pop_front() {
                    // Like the real client: ids cycle through its in-flight range, skipping
                    // those still awaiting a PUBACK.
                    loop {
                        self.next_pkid = self.next_pkid % 100 + 1;
                        if !self.wire.contains_key(&self.next_pkid) {
                            break;
                        }
                    }
                    self.wire.insert(self.next_pkid, seq);
                    self.to_broker.push_back((self.next_pkid, seq));
                    self.m.sent(self.next_pkid);
                }
            }
            Op::BrokerTakes { lose } => {
                if let Some((pkid, seq)) = self.to_broker.pop_front() {
                    if !is_row(seq) {
                        let p = self.presences[(-seq - 1) as usize];
                        self.upstream_presence.push(p);
                    } else if self.first_seen.insert(seq) {
                        // (e) first deliveries in queue order.
                        prop_assert!(
                            self.first_seen.iter().all(|&s| s <= seq),
                            "row {} first delivered after a later one",
                            seq
                        );
                    } else {
                        // (e) a duplicate is of a row still queued.
                        prop_assert!(
                            self.queue.contains_key(&seq),
                            "duplicate of removed {}",
                            seq
                        );
                    }
                    if is_row(seq) {
                        self.upstream.push(seq);
                    }
                    if !lose {
                        self.to_client.push_back(pkid);
                    }
                }
            }
            Op::AckArrives => {
                if let Some(pkid) = self.to_client.pop_front() {
                    let seq = self.wire.remove(&pkid).expect("acked on the wire");
                    if is_row(seq) {
                        self.acked.insert(seq);
                        self.expect_delivered = Some(seq);
                    } else {
                        self.expect_announced = Some(self.presences[(-seq - 1) as usize].0);
                    }
                    prop_assert!(self.m.puback(pkid), "PUBACK of {} not taken", seq);
                }
            }
            Op::StaleAck(i) => {
                let stale: Vec<u16> = self
                    .old_pkids
                    .iter()
                    .copied()
                    .filter(|p| !self.wire.contains_key(p))
                    .collect();
                if let Some(&p) = stale.get(i % stale.len().max(1)) {
                    prop_assert!(!self.m.puback(p), "a stale PUBACK was taken");
                }
            }
            Op::ReadDone { fail } => {
                if let Some((read, after, room)) = self.reads.pop_front() {
                    let rows: Vec<Row> = if fail {
                        Vec::new()
                    } else {
                        self.queue
                            .range(after + 1..)
                            .take(room)
                            .map(|(&seq, &len)| Row { seq, len })
                            .collect()
                    };
                    self.m.rows(read, &rows);
                }
            }
            Op::RemoveDone { fail } => {
                if let Some(seqs) = self.removes.pop_front() {
                    if !fail {
                        for s in &seqs {
                            self.queue.remove(s);
                        }
                    }
                    self.m.removed(&seqs, !fail);
                }
            }
            Op::RefuseNext => self.refuse_next = true,
            Op::Drop => {
                if self.connected {
                    self.drop_connection();
                    self.faults += 1;
                    self.m.disconnected(self.now, self.now_bits());
                }
            }
            Op::AttemptFails => {
                if !self.connected && self.retry_at.is_none_or(|t| self.now >= t) {
                    self.faults += 1;
                    self.m.disconnected(self.now, self.now_bits());
                }
            }
            Op::Connect => {
                if !self.connected && self.retry_at.is_none_or(|t| self.now >= t) {
                    prop_assert_eq!(self.m.upstream(), self.address);
                    self.connected = true;
                    self.sent_here.clear();
                    self.presence_at = None;
                    self.m.connected(self.now, self.faults.is_multiple_of(2));
                }
            }
            Op::Devices(known, online) => {
                self.counts = DeviceCounts {
                    known: u32::from(known),
                    online: u32::from(online),
                };
                self.m.devices(self.now, self.counts);
            }
            Op::Tick(ms) => {
                self.now += Duration::from_millis(u64::from(ms));
                self.m.tick(self.now);
                self.run()?;
                // (j) on a live connection, presence is handed over again at least once per
                // refresh (a tick is the first moment the machine can see it is due).
                if self.connected {
                    if let Some(at) = self.presence_at {
                        prop_assert!(
                            self.now < at + PRESENCE_REFRESH,
                            "presence not refreshed since {:?}",
                            self.now - at
                        );
                    }
                }
                // (i) a refusal is followed by a new request within the longest delay.
                if let Some(at) = self.refused_at {
                    prop_assert!(
                        self.now < at + RESUBSCRIBE_MAX,
                        "a refused subscription was not asked for again within {:?}",
                        RESUBSCRIBE_MAX
                    );
                }
            }
            Op::SubscriptionRefused => {
                if self.connected {
                    self.refused_at.get_or_insert(self.now);
                    self.m.subscribe_refused(self.now);
                }
            }
            Op::Crash => {
                self.drop_connection();
                self.faults += 1;
                self.reads.clear();
                // A removal not yet committed is lost with the process.
                self.removes.clear();
                self.refuse_next = false;
                self.retry_at = None;
                self.address = 0;
                self.m = Machine::new(model_config());
                // The assembly hands the new bridge the counts before it runs.
                self.m.devices(self.now, self.counts);
            }
        }
        self.run()
    }

    fn now_bits(&self) -> u64 {
        (self.faults as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// Delivers everything in transit on a live connection.
    fn deliver(&mut self) -> Result<(), TestCaseError> {
        while !self.reads.is_empty() {
            self.step(Op::ReadDone { fail: false })?;
        }
        while !self.client.is_empty() {
            self.step(Op::ClientSends)?;
        }
        while !self.to_broker.is_empty() {
            self.step(Op::BrokerTakes { lose: false })?;
        }
        while !self.to_client.is_empty() {
            self.step(Op::AckArrives)?;
        }
        while !self.removes.is_empty() {
            self.step(Op::RemoveDone { fail: false })?;
        }
        Ok(())
    }

    /// (c) With the link up and nothing lost, everything queued arrives and the queue drains;
    /// (h) the upstream broker ends up with the gateway online and its current counts;
    /// (i) a subscription refused on the live connection is asked for again.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        // A PUBACK lost on a live connection is only recovered by a new connection (MQTT
        // 3.1.1 re-sends nothing within one): the lossy one ends first.
        let in_transit = self.to_broker.len() + self.to_client.len();
        if self.connected && self.wire.len() > in_transit {
            self.step(Op::Drop)?;
        }
        for _ in 0..10_000 {
            if !self.connected {
                if let Some(t) = self.retry_at {
                    self.now = self.now.max(t);
                }
                self.step(Op::Connect)?;
            }
            self.deliver()?;
            if self.queue.is_empty() {
                break;
            }
            self.step(Op::Tick(50))?;
        }
        prop_assert!(self.queue.is_empty(), "left queued: {:?}", self.queue);
        // (i) a refusal still open on the live connection is asked for again in time.
        if self.refused_at.is_some() {
            for _ in 0..21 {
                self.step(Op::Tick(1_500))?;
            }
            prop_assert!(
                self.refused_at.is_none(),
                "a refused subscription never asked again"
            );
        }
        let delivered: HashSet<i64> = self.upstream.iter().copied().collect();
        for s in &self.all {
            prop_assert!(delivered.contains(s), "row {} never delivered", s);
        }
        prop_assert!(self.connected);
        for _ in 0..3 {
            if self.upstream_presence.last() == Some(&(true, self.counts)) {
                break;
            }
            self.step(Op::Tick(PRESENCE_INTERVAL.as_millis() as u16))?;
            self.deliver()?;
        }
        prop_assert_eq!(self.upstream_presence.last(), Some(&(true, self.counts)));
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Also (i): a refused downward subscription is asked for again on its connection, not
    /// sooner than the shortest delay and within the longest; (j) presence is handed over
    /// again at least once per refresh on a live connection.
    #[test]
    fn every_row_goes_up_at_least_once_in_order_and_leaves_the_queue_only_when_acknowledged(
        ops in prop::collection::vec(op(), 0..400),
    ) {
        let mut model = Model::new();
        for op in ops {
            model.step(op)?;
        }
        model.settle()?;
        let duplicates = model.upstream.len() - model.first_seen.len();
        // Duplicates come only from a lost connection or a restart.
        if model.faults == 0 {
            prop_assert_eq!(duplicates, 0);
        }
    }
}
