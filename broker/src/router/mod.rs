//! The driver of the gateway's MQTT core ([`fleet_mqtt::Engine`]): the engine behind a lock,
//! the wake-up of each connection, the durable-session writer and the clock.
//!
//! Every connection (a client's socket in the edge, or a service's in-process [`ServiceLink`])
//! gets a [`Port`]: an id, a wake-up and a close signal. It hands the engine what it receives
//! through [`Router`], and when woken takes what the engine has for it with
//! [`Router::transmit`]. The engine never waits and is never held across an `.await`; whatever
//! the engine asks for is carried out here: wake-ups, closes, store writes (applied in order by
//! the session writer, which reports them durable), notices (counted, logged with a rate
//! limit).

mod link;
mod notices;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fleet_mqtt::{
    Action, Authorizer, CloseReason, ConnId, Connect, Disconnected, Engine, Packet, SessionKey,
    Settings, StoreOp, StoreSeq,
};
use tokio::sync::{mpsc, Notify};

use crate::metrics::Metrics;

pub use link::LinkError;
pub(crate) use link::{Received, ServiceLink};

/// One connection's end of the router: its id, how it is woken, and why the engine closed it.
#[derive(Debug)]
pub(crate) struct Port {
    /// The engine's id for the connection.
    pub id: ConnId,
    /// Notified when the engine has packets for the connection or closed it.
    pub wake: Arc<Notify>,
    closed: Arc<Mutex<Option<CloseReason>>>,
}

impl Port {
    /// Why the engine closed the connection, once it did.
    pub(crate) fn closed(&self) -> Option<CloseReason> {
        lock(&self.closed).clone()
    }
}

struct Conn {
    wake: Arc<Notify>,
    closed: Arc<Mutex<Option<CloseReason>>>,
}

struct Inner {
    engine: Mutex<Engine>,
    conns: Mutex<HashMap<ConnId, Conn>>,
    next_conn: AtomicU64,
    store: mpsc::UnboundedSender<Vec<(StoreSeq, StoreOp)>>,
    metrics: Arc<Metrics>,
    notices: notices::Notices,
}

/// The running MQTT core. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Router {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Router")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        // A panic while holding the lock is a bug; the state is still the best there is.
        Err(p) => p.into_inner(),
    }
}

impl Router {
    /// An engine with `settings`, checking access with `authorizer`. Store writes go to
    /// `store` in order; the writer calls [`Router::durable`] once they are durable.
    pub(crate) fn new(
        settings: Settings,
        authorizer: Arc<dyn Authorizer>,
        store: mpsc::UnboundedSender<Vec<(StoreSeq, StoreOp)>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Router {
            inner: Arc::new(Inner {
                engine: Mutex::new(Engine::new(settings, authorizer)),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                store,
                metrics,
                notices: notices::Notices::default(),
            }),
        }
    }

    /// Runs `f` on the engine, then carries out what it asked for. The call's store writes go
    /// to the writer while the lock is still held, as one message: in the engine's order
    /// across calls from every thread, and committed together (the engine's crash rules hold
    /// for whole calls).
    fn with_engine<R>(&self, f: impl FnOnce(&mut Engine) -> R) -> R {
        let mut actions = Vec::new();
        let r = {
            let mut engine = lock(&self.inner.engine);
            let r = f(&mut engine);
            let mut writes = Vec::new();
            while let Some(a) = engine.poll_action() {
                match a {
                    Action::Store { seq, op } => writes.push((seq, op)),
                    a => actions.push(a),
                }
            }
            if !writes.is_empty() && self.inner.store.send(writes).is_err() {
                // The writer stopped after a store failure and said why. Nothing that
                // waits for durability is answered from now on.
                Metrics::inc(&self.inner.metrics.store_errors);
            }
            r
        };
        self.dispatch(actions);
        r
    }

    fn dispatch(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Transmit(conn) => {
                    if let Some(c) = lock(&self.inner.conns).get(&conn) {
                        c.wake.notify_one();
                    }
                }
                Action::Close { conn, reason } => {
                    if let Some(c) = lock(&self.inner.conns).remove(&conn) {
                        *lock(&c.closed) = Some(reason);
                        c.wake.notify_one();
                    }
                }
                // Sent to the writer in `with_engine`.
                Action::Store { .. } => {}
                Action::Notice(n) => self.inner.notices.note(&self.inner.metrics, n),
            }
        }
    }

    /// A new connection's port.
    pub(crate) fn attach(&self) -> Port {
        let id = ConnId(self.inner.next_conn.fetch_add(1, Ordering::Relaxed));
        let wake = Arc::new(Notify::new());
        let closed = Arc::new(Mutex::new(None));
        lock(&self.inner.conns).insert(
            id,
            Conn {
                wake: wake.clone(),
                closed: closed.clone(),
            },
        );
        Port { id, wake, closed }
    }

    /// The client on `port` sent `connect` and is `key`: the engine answers with CONNACK
    /// (see [`Router::transmit`]).
    pub(crate) fn connect(&self, port: &Port, key: SessionKey, connect: Connect) {
        self.with_engine(|e| e.connect(Instant::now(), port.id, key, connect));
    }

    /// A packet from the client on `port`.
    pub(crate) fn packet(&self, port: &Port, packet: Packet) {
        self.with_engine(|e| e.packet(Instant::now(), port.id, packet));
    }

    /// The connection on `port` ended (unless the engine closed it).
    pub(crate) fn disconnected(&self, port: &Port, how: Disconnected) {
        let known = lock(&self.inner.conns).remove(&port.id).is_some();
        if known {
            self.with_engine(|e| e.disconnected(Instant::now(), port.id, how));
        }
    }

    /// Takes up to `max_bytes` of packets for `port`.
    pub(crate) fn transmit(&self, port: &Port, max_bytes: usize, out: &mut Vec<Packet>) {
        self.with_engine(|e| e.transmit(port.id, max_bytes, out));
    }

    /// The store made every write up to `seq` durable.
    pub(crate) fn durable(&self, seq: StoreSeq) {
        self.with_engine(|e| e.durable(Instant::now(), seq));
    }

    /// Replaces the access policy; live and stored subscriptions are checked again.
    pub(crate) fn set_authorizer(&self, authorizer: Arc<dyn Authorizer>) {
        self.with_engine(|e| e.set_authorizer(Instant::now(), authorizer));
    }

    /// Rebuilds the sessions and retained messages the store kept.
    pub(crate) fn restore(
        &self,
        sessions: Vec<fleet_mqtt::StoredSession>,
        retained: Vec<fleet_mqtt::Message>,
    ) {
        self.with_engine(|e| e.restore(Instant::now(), sessions, retained));
    }

    /// Ticks the engine's clock once a second until the runtime stops.
    pub(crate) fn spawn_clock(&self) {
        let router = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                router.with_engine(|e| e.tick(Instant::now()));
            }
        });
    }
}
