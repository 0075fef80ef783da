//! `bench-mqtt`: the gateway's MQTT core side by side with Mosquitto (a benchmark, not a test).
//!
//! In one run, starts the release `gateway` binary and Mosquitto (Debian's, 2.0.11 on the
//! reference machine) with the same PKI, mTLS required by both and an equivalent ACL (see
//! `fleet_tests::brokers`), each as its own process on 127.0.0.1, a fresh one for every
//! scenario and broker, and drives both with the same load from this process (TCP_NODELAY,
//! every client its own device certificate, no TLS session resumption; receiving clients on a
//! thread of their own):
//! 1. `idle`: memory per idle mTLS connection with N held (VmRSS before and after);
//! 2. `connects`: mTLS connects per second (handshake, CONNECT, CONNACK, DISCONNECT) with K
//!    connectors at once, nothing else limiting the rate;
//! 3. `rate`: QoS 1, 256 B, P device publishers -> 1 service subscriber at a fixed offered
//!    rate: p50/p99 latency (from each message's send time, stamped in its payload, to its
//!    arrival), the acknowledged rate (short of the offered one if the publishers' windows
//!    held them back), delivered and lost;
//! 4. `flat`: the same publishers as fast as W unacknowledged messages each allow:
//!    acknowledged/s, delivered/s, and lost = acknowledged - delivered once the subscriber has
//!    been idle for a second;
//! 5. `fanout`: one service publishes 16 KiB QoS 1 round-robin to D devices' own command
//!    topics, M each, the devices subscribed at QoS 1 and acknowledging: MiB/s delivered, and
//!    the broker's peak RSS.
//!
//! Beside each figure: the broker's CPU seconds (utime + stime) during the measure and its
//! memory. Ends with a markdown table of both brokers and their ratio.
//!
//! A broker that stops answering fails the run: every phase is watched, and one that makes no
//! progress (no connect, acknowledgement or delivery) for `--stall-secs` is an error. Brokers
//! are killed on exit, on error and on Ctrl-C.
//!
//! Run: `./scripts/bench.sh mqtt [flags]` (builds both binaries in release mode first).

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use fleet_certs::pki::{InitOptions, Pki};
use fleet_certs::profile::Validity;
use fleet_certs::{Identity, Role};
use fleet_tests::brokers::{self, Broker, Kind, Tls};
use fleet_tests::mqtt::{self, Client, Deliveries, PublishPlan};
use tokio::task::JoinSet;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Longest a single mTLS connect (TCP, handshake, CONNECT/CONNACK) or SUBSCRIBE may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Keep-alive of every client: long enough that no PINGREQ is part of any figure.
const KEEP_ALIVE: u16 = 600;

/// After the publishers stop: how long the subscriber must have been idle to be drained.
const IDLE_DRAINED: Duration = Duration::from_secs(1);

/// Longest wait for outstanding acknowledgements, and for the subscriber to drain.
const DRAIN_BOUND: Duration = Duration::from_secs(60);

/// The topic device publishers use (`devices/{id}/bench`): one that nothing inside the gateway
/// consumes, added to both brokers' policies (see `fleet_tests::brokers`).
const DEVICE_TOPIC: &str = brokers::BENCH_TOPIC;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Connects,
    Rate,
    Flat,
    Fanout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Gateway,
    Mosquitto,
}

impl From<Which> for Kind {
    fn from(w: Which) -> Kind {
        match w {
            Which::Gateway => Kind::Gateway,
            Which::Mosquitto => Kind::Mosquitto,
        }
    }
}

/// The MQTT core benchmark: the release gateway and Mosquitto side by side.
#[derive(Debug, Clone, Parser)]
#[command(name = "bench-mqtt")]
struct Args {
    /// Scenarios to run, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,connects,rate,flat,fanout"
    )]
    scenarios: Vec<Scenario>,
    /// Brokers to measure.
    #[arg(long, value_delimiter = ',', default_value = "gateway,mosquitto")]
    brokers: Vec<Which>,
    /// idle: connections held.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// connects: connections opened (and closed) in total.
    #[arg(long, default_value_t = 2_000)]
    connects: usize,
    /// idle, connects: connections being opened at once.
    #[arg(long, default_value_t = 32)]
    connectors: usize,
    /// rate, flat: device publishers (one service subscribes to all).
    #[arg(long, default_value_t = 100)]
    publishers: usize,
    /// rate: offered rates to measure, messages per second in total.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    rates: Vec<u64>,
    /// rate: most unacknowledged messages per publisher.
    #[arg(long, default_value_t = 64)]
    rate_window: u16,
    /// rate, flat: seconds of publishing per measure.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// rate, flat: payload bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// flat: unacknowledged messages per publisher.
    #[arg(long, default_value_t = 16)]
    window: u16,
    /// fanout: devices, each subscribed to its own command topic.
    #[arg(long, default_value_t = 100)]
    fanout_devices: usize,
    /// fanout: messages to each device.
    #[arg(long, default_value_t = 2_000)]
    fanout_messages: u64,
    /// fanout: payload bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    fanout_size: usize,
    /// fanout: the service's unacknowledged messages.
    #[arg(long, default_value_t = 64)]
    fanout_window: u16,
    /// A phase with no progress (connect, acknowledgement, delivery) for this long fails the run.
    #[arg(long, default_value_t = 10)]
    stall_secs: u64,
    /// A setting for the gateway, as its environment variable (repeatable), for example
    /// GATEWAY__LIMITS__CONNECT_TIMEOUT=30s.
    #[arg(long = "gateway-env", value_name = "KEY=VALUE", value_parser = key_value)]
    gateway_env: Vec<(String, String)>,
    /// A line added to Mosquitto's configuration (repeatable), for example
    /// "max_queued_messages 10000". The default keeps Mosquitto's own defaults.
    #[arg(long = "mosquitto-option", value_name = "LINE")]
    mosquitto_options: Vec<String>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl Args {
    /// The flags, all of them, as they would be given.
    fn command_line(&self) -> String {
        let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let names = |v: Vec<String>| v.join(",");
        format!(
            "bench-mqtt --scenarios {} --brokers {} --idle {} --connects {} --connectors {} \
             --publishers {} --rates {} --rate-window {} --seconds {} --size {} --window {} \
             --fanout-devices {} --fanout-messages {} --fanout-size {} --fanout-window {} \
             --stall-secs {}{}",
            names(self.scenarios.iter().map(|s| value_name(*s)).collect()),
            names(self.brokers.iter().map(|b| value_name(*b)).collect()),
            self.idle,
            self.connects,
            self.connectors,
            self.publishers,
            list(&self.rates),
            self.rate_window,
            self.seconds,
            self.size,
            self.window,
            self.fanout_devices,
            self.fanout_messages,
            self.fanout_size,
            self.fanout_window,
            self.stall_secs,
            self.gateway_env
                .iter()
                .map(|(k, v)| format!(" --gateway-env {k}={v}"))
                .chain(
                    self.mosquitto_options
                        .iter()
                        .map(|o| format!(" --mosquitto-option '{o}'"))
                )
                .collect::<String>(),
        )
    }
}

fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

/// A client identity: id and its TLS configuration.
type Ident = (String, Arc<rustls::ClientConfig>);

/// What every measure needs.
struct Ctx {
    args: Args,
    dir: PathBuf,
    tls: Tls,
    devices: Vec<Ident>,
    service: Ident,
    runs: AtomicUsize,
    /// The runtime of every receiving client (see `main`).
    receivers: tokio::runtime::Handle,
}

impl Ctx {
    /// A fresh broker of `kind` for one measure.
    fn start(&self, kind: Kind) -> Result<Broker, Error> {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(format!("{kind}-{n}"));
        let broker = match kind {
            Kind::Gateway => {
                let a = &self.args;
                let max = a.idle.max(a.connects) + a.publishers + a.fanout_devices + 100;
                Broker::gateway(&dir, &self.tls, max, &a.gateway_env)?
            }
            Kind::Mosquitto => Broker::mosquitto(
                &dir,
                &self.tls,
                &self.service.0,
                &self.args.mosquitto_options,
            )?,
        };
        Ok(broker)
    }

    fn stall(&self) -> Duration {
        Duration::from_secs(self.args.stall_secs)
    }
}

/// Every client's TLS: trusts the CA, presents its own certificate, and never resumes a TLS
/// session, so each connect is a full mTLS handshake on either broker.
fn identities(pki: &Pki, prefix: &str, n: usize, role: Role) -> Result<Vec<Ident>, Error> {
    let ca = Pki::ca_cert_path(pki.dir());
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i:05}");
            let issued =
                pki.sign_unrecorded(&Identity::new(role, &id)?, Validity::days_from_now(2))?;
            let mut config =
                (*mqtt::client_config(&ca, &issued.cert_pem, &issued.key_pem)?).clone();
            config.resumption = rustls::client::Resumption::disabled();
            Ok((id, Arc::new(config)))
        })
        .collect()
}

/// An mTLS connection with CONNACK accepted, within [`CONNECT_TIMEOUT`].
async fn connect(addr: &str, (id, config): &Ident) -> Result<Client, Error> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        Client::connect(addr, config.clone(), id, KEEP_ALIVE),
    )
    .await
    .map_err(|_| format!("{id}: no CONNACK within {} s", CONNECT_TIMEOUT.as_secs()))?
    .map_err(|e| format!("{id}: {e}").into())
}

/// `connect`, then SUBSCRIBE at QoS 1 and SUBACK granting it.
async fn subscriber(addr: &str, who: &Ident, filter: &str) -> Result<Client, Error> {
    let mut c = connect(addr, who).await?;
    tokio::time::timeout(CONNECT_TIMEOUT, c.subscribe(filter, 1))
        .await
        .map_err(|_| format!("{}: no SUBACK for {filter}", who.0))?
        .map_err(|e| format!("{}: {e}", who.0))?;
    Ok(c)
}

/// Runs `work` while watching `broker`: fails if the broker exits, or if `progress` (a count
/// that grows while anything happens) stays the same for `stall`.
async fn watched<T>(
    broker: &Broker,
    what: &str,
    stall: Duration,
    progress: impl Fn() -> u64,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let watch = async {
        let (mut last, mut since) = (progress(), Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !broker.running() {
                return format!("{} exited during {what}", broker.kind());
            }
            let now = progress();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= stall {
                return format!(
                    "{}: no progress for {} s during {what} (stuck at {now}); is it still answering?",
                    broker.kind(),
                    stall.as_secs()
                );
            }
        }
    };
    tokio::select! {
        r = work => r,
        e = watch => Err(e.into()),
    }
}

/// Opens a connection for each of `ids`, `connectors` at a time; each is handed to `then`
/// with its client id, and `opened` counts them. The connections are made, and `then` runs, on
/// `runtime`. The results come in completion order.
async fn connect_all<T: Send + 'static, F, Fut>(
    runtime: &tokio::runtime::Handle,
    addr: &str,
    ids: &[Ident],
    connectors: usize,
    opened: Arc<AtomicU64>,
    then: F,
) -> Result<Vec<T>, Error>
where
    F: Fn(String, Client) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Error>> + Send,
{
    let ids: Arc<Vec<Ident>> = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(Vec::with_capacity(ids.len())));
    let mut workers = JoinSet::new();
    for _ in 0..connectors.clamp(1, ids.len().max(1)) {
        let (ids, next, out, opened, then) = (
            ids.clone(),
            next.clone(),
            out.clone(),
            opened.clone(),
            then.clone(),
        );
        let addr = addr.to_owned();
        workers.spawn_on(
            async move {
                loop {
                    let Some(who) = ids.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return Ok::<_, Error>(());
                    };
                    let kept = then(who.0.clone(), connect(&addr, who).await?).await?;
                    opened.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut v) = out.lock() {
                        v.push(kept);
                    }
                }
            },
            runtime,
        );
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    let mut v = out.lock().map_err(|_| "a connector panicked")?;
    Ok(std::mem::take(&mut *v))
}

/// One broker's result for one measure: the cell text, and the figure the ratio is taken of.
struct Figure {
    cell: String,
    value: f64,
}

/// One row of the table.
struct Row {
    measure: String,
    /// What the ratio compares.
    ratio_of: &'static str,
    figures: Vec<(Kind, Figure)>,
}

fn mib(kib: u64) -> String {
    if kib >= 10 * 1024 * 1024 {
        format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0))
    } else {
        format!("{} MiB", (kib + 512) / 1024)
    }
}

/// Thousands separators.
fn n(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// CPU seconds the broker and this load generator had used at one moment. Both share the
/// machine's cores, so the generator's share says how much was left for the broker.
#[derive(Clone, Copy)]
struct Cpu {
    broker: f64,
    generator: f64,
}

impl Cpu {
    fn now(broker: &Broker) -> Cpu {
        Cpu {
            broker: broker.cpu_seconds(),
            generator: fleet_tests::procs::cpu_seconds(std::process::id()),
        }
    }

    /// What each used since `self`.
    fn since(self, broker: &Broker) -> Cpu {
        let now = Cpu::now(broker);
        Cpu {
            broker: now.broker - self.broker,
            generator: now.generator - self.generator,
        }
    }
}

fn cpu_note(cpu: Cpu, secs: f64) -> String {
    let share = |c: f64| 100.0 * c / secs.max(1e-9);
    format!(
        "CPU {:.1} s ({:.0} % of a core; load generator {:.1} s, {:.0} %)",
        cpu.broker,
        share(cpu.broker),
        cpu.generator,
        share(cpu.generator)
    )
}

// 1. Memory per idle connection.
async fn idle(ctx: &Ctx, broker: &Broker) -> Result<Figure, Error> {
    let n_held = ctx.args.idle.min(ctx.devices.len());
    // Let the broker finish starting up before its baseline is read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (base, cpu0) = (broker.rss_kib(), Cpu::now(broker));
    let opened = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let progress = opened.clone();
    let held = watched(
        broker,
        "idle connects",
        ctx.stall(),
        move || progress.load(Ordering::Relaxed),
        connect_all(
            &tokio::runtime::Handle::current(),
            &broker.address(),
            &ctx.devices[..n_held],
            ctx.args.connectors,
            opened,
            |_, c| async move { Ok(c) },
        ),
    )
    .await?;
    let took = start.elapsed().as_secs_f64();
    // Memory settles once the last handshakes' buffers are freed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = broker.rss_kib();
    let per = rss.saturating_sub(base) as f64 / held.len().max(1) as f64;
    let cpu = cpu0.since(broker);
    drop(held);
    Ok(Figure {
        cell: format!(
            "**{per:.1} KiB** (RSS {} -> {}; {} opened in {took:.1} s, CPU {:.1} s)",
            mib(base),
            mib(rss),
            n(n_held as u64),
            cpu.broker
        ),
        value: per,
    })
}

// 2. Connects per second.
async fn connects(ctx: &Ctx, broker: &Broker) -> Result<Figure, Error> {
    let total = ctx.args.connects.min(ctx.devices.len());
    let opened = Arc::new(AtomicU64::new(0));
    let cpu0 = Cpu::now(broker);
    let start = Instant::now();
    let progress = opened.clone();
    watched(
        broker,
        "connects",
        ctx.stall(),
        move || progress.load(Ordering::Relaxed),
        connect_all(
            &tokio::runtime::Handle::current(),
            &broker.address(),
            &ctx.devices[..total],
            ctx.args.connectors,
            opened,
            |_, c| async move {
                c.disconnect().await;
                Ok(())
            },
        ),
    )
    .await?;
    let secs = start.elapsed().as_secs_f64();
    let rate = total as f64 / secs;
    Ok(Figure {
        cell: format!(
            "**{}/s** ({} in {secs:.2} s; {}, RSS {})",
            n(rate as u64),
            n(total as u64),
            cpu_note(cpu0.since(broker), secs),
            mib(broker.rss_kib())
        ),
        value: rate,
    })
}

/// Publishers' and subscriber's counts of one QoS 1 measure.
struct Flow {
    /// Acknowledged to publishers.
    acked: u64,
    /// Sent by publishers.
    sent: u64,
    /// Delivered to the subscriber(s).
    delivered: u64,
    /// Payload bytes delivered.
    bytes: u64,
    /// From the first publish to the last publisher done.
    publish_secs: f64,
    /// From the first publish to the last delivery.
    deliver_secs: f64,
    /// Whether the drain ended at its bound rather than with the subscriber idle.
    drain_bound_hit: bool,
    /// CPU seconds from the first publish to the end of the drain.
    cpu: Cpu,
    /// Seconds from the first publish to the end of the drain.
    measured_secs: f64,
    /// Latencies in nanoseconds, sorted (with `latency`).
    latencies: Vec<u64>,
}

impl Flow {
    fn lost(&self) -> u64 {
        self.acked.saturating_sub(self.delivered)
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let i = ((self.latencies.len() as f64 * p) as usize)
            .min(self.latencies.len().saturating_sub(1));
        self.latencies.get(i).map_or(f64::NAN, |v| *v as f64 / 1e6)
    }

    fn lost_note(&self) -> String {
        let mut s = if self.lost() == 0 {
            "0 lost".to_owned()
        } else {
            format!(
                "**{} lost** ({:.0} % of acknowledged)",
                n(self.lost()),
                100.0 * self.lost() as f64 / self.acked.max(1) as f64
            )
        };
        if self.delivered > self.acked {
            s.push_str(&format!(
                ", {} more delivered than acknowledged",
                n(self.delivered - self.acked)
            ));
        }
        if self.sent > self.acked {
            s.push_str(&format!(
                ", {} never acknowledged",
                n(self.sent - self.acked)
            ));
        }
        if self.drain_bound_hit {
            s.push_str(&format!(", drain stopped at {} s", DRAIN_BOUND.as_secs()));
        }
        s
    }
}

/// One QoS 1 flow: `publishers` to `subscribers`, until every publisher is done, then a drain.
/// `plan(i, base)` is publisher `i`'s plan: `base` is the instant its stamps and times count
/// from, taken just before the publishers start.
async fn flow(
    ctx: &Ctx,
    broker: &Broker,
    what: &str,
    subscribers: Vec<Client>,
    publishers: Vec<Client>,
    plan: impl Fn(usize, Instant) -> PublishPlan,
    latency: bool,
) -> Result<Flow, Error> {
    let base = Instant::now();
    let seen = Arc::new(Deliveries::default());
    let lat = latency.then(|| Arc::new(Mutex::new(Vec::new())));
    let mut tasks = JoinSet::new();
    let mut receivers = JoinSet::new();
    for mut s in subscribers {
        let (seen, lat) = (seen.clone(), lat.clone());
        receivers.spawn_on(
            async move { s.receive_and_ack_batched(base, seen, lat).await },
            &ctx.receivers,
        );
    }
    let acked = Arc::new(AtomicU64::new(0));
    let cpu0 = Cpu::now(broker);
    let start = Instant::now();
    for (i, mut p) in publishers.into_iter().enumerate() {
        let (acked, plan) = (acked.clone(), plan(i, base));
        tasks.spawn(async move {
            let done = p.publish_qos1(&plan, &acked).await.map_err(|e| {
                let topic = plan.topics.first().map_or("", String::as_str);
                format!("the publisher to {topic}: {e}")
            })?;
            p.disconnect().await;
            Ok::<_, Error>(done)
        });
    }
    let (a, s) = (acked.clone(), seen.clone());
    let progress = move || a.load(Ordering::Relaxed) + s.count.load(Ordering::Relaxed);
    let sent = watched(broker, what, ctx.stall(), &progress, async {
        let mut sent = 0;
        loop {
            tokio::select! {
                done = tasks.join_next() => match done {
                    Some(r) => sent += r??.sent,
                    None => return Ok(sent),
                },
                // A subscriber whose connection fails ends the measure.
                Some(r) = receivers.join_next() => {
                    r??;
                    return Err("a subscriber stopped receiving".into());
                }
            }
        }
    })
    .await?;
    let publish_secs = start.elapsed().as_secs_f64();
    let acked = acked.load(Ordering::Relaxed);
    // Drain: until everything acknowledged has arrived or the subscribers have been idle.
    let bound = Instant::now() + DRAIN_BOUND;
    let drain_bound_hit = loop {
        let delivered = seen.count.load(Ordering::Relaxed);
        let last = Duration::from_nanos(seen.last_nanos.load(Ordering::Relaxed));
        let idle = base.elapsed().saturating_sub(last);
        if delivered >= acked && idle >= Duration::from_millis(100) || idle >= IDLE_DRAINED {
            break false;
        }
        if Instant::now() >= bound {
            break true;
        }
        if let Some(Ok(Err(e))) = receivers.try_join_next() {
            return Err(format!("a subscriber stopped receiving: {e}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = cpu0.since(broker);
    let measured_secs = start.elapsed().as_secs_f64();
    receivers.abort_all();
    let last = Duration::from_nanos(seen.last_nanos.load(Ordering::Relaxed));
    let deliver_secs = last
        .saturating_sub(start.saturating_duration_since(base))
        .as_secs_f64();
    let mut latencies = lat
        .and_then(|l| l.lock().ok().map(|v| v.clone()))
        .unwrap_or_default();
    latencies.sort_unstable();
    Ok(Flow {
        acked,
        sent,
        delivered: seen.count.load(Ordering::Relaxed),
        bytes: seen.payload_bytes.load(Ordering::Relaxed),
        publish_secs,
        deliver_secs,
        drain_bound_hit,
        cpu,
        measured_secs,
        latencies,
    })
}

/// The service subscribed to every device's reports, and `publishers` devices connected:
/// (id, client) each.
async fn devices_to_service(
    ctx: &Ctx,
    broker: &Broker,
) -> Result<(Client, Vec<(String, Client)>), Error> {
    let addr = broker.address();
    let (a, who) = (addr.clone(), ctx.service.clone());
    let sub = ctx
        .receivers
        .spawn(async move { subscriber(&a, &who, &format!("devices/+/{DEVICE_TOPIC}")).await })
        .await??;
    let count = ctx.args.publishers.min(ctx.devices.len());
    let pubs = connect_all(
        &tokio::runtime::Handle::current(),
        &addr,
        &ctx.devices[..count],
        ctx.args.connectors,
        Arc::new(AtomicU64::new(0)),
        |id, c| async move { Ok((id, c)) },
    )
    .await?;
    Ok((sub, pubs))
}

/// The topic a device publishes its (benchmark) reports on.
fn device_topic(id: &str) -> String {
    format!("devices/{id}/{DEVICE_TOPIC}")
}

// 3. Fixed offered rate.
async fn rate(ctx: &Ctx, broker: &Broker, offered: u64) -> Result<Figure, Error> {
    let a = &ctx.args;
    let (sub, pubs) = devices_to_service(ctx, broker).await?;
    let (ids, clients): (Vec<String>, Vec<Client>) = pubs.into_iter().unzip();
    let count = clients.len().max(1);
    let each = offered as f64 / count as f64;
    let f = flow(
        ctx,
        broker,
        "the fixed-rate publish",
        vec![sub],
        clients,
        |i, base| PublishPlan {
            topics: vec![device_topic(&ids[i])],
            size: a.size,
            window: a.rate_window,
            rate: Some(each),
            // Spread the publishers' sends over one period.
            offset: Duration::from_secs_f64(i as f64 / count as f64 / each.max(1e-9)),
            limit: None,
            stop: base + Duration::from_secs(a.seconds),
            drain_until: base + Duration::from_secs(a.seconds) + DRAIN_BOUND,
            base,
        },
        true,
    )
    .await?;
    Ok(Figure {
        cell: format!(
            "**{:.2} / {:.2} ms**; {} delivered ({}/s acknowledged), {}; {}, RSS {}",
            f.percentile_ms(0.50),
            f.percentile_ms(0.99),
            n(f.delivered),
            n((f.acked as f64 / f.publish_secs) as u64),
            f.lost_note(),
            cpu_note(f.cpu, f.measured_secs),
            mib(broker.rss_kib())
        ),
        value: f.percentile_ms(0.99),
    })
}

// 4. Flat out.
async fn flat(ctx: &Ctx, broker: &Broker) -> Result<Figure, Error> {
    let a = &ctx.args;
    let (sub, pubs) = devices_to_service(ctx, broker).await?;
    let (ids, clients): (Vec<String>, Vec<Client>) = pubs.into_iter().unzip();
    let f = flow(
        ctx,
        broker,
        "the flat-out publish",
        vec![sub],
        clients,
        |i, base| PublishPlan {
            topics: vec![device_topic(&ids[i])],
            size: a.size,
            window: a.window,
            rate: None,
            offset: Duration::ZERO,
            limit: None,
            stop: base + Duration::from_secs(a.seconds),
            drain_until: base + Duration::from_secs(a.seconds) + DRAIN_BOUND,
            base,
        },
        false,
    )
    .await?;
    let delivered_rate = f.delivered as f64 / f.deliver_secs.max(1e-9);
    Ok(Figure {
        cell: format!(
            "{}/s acknowledged, **{}/s delivered**, {}; {}, RSS {}",
            n((f.acked as f64 / f.publish_secs) as u64),
            n(delivered_rate as u64),
            f.lost_note(),
            cpu_note(f.cpu, f.measured_secs),
            mib(broker.rss_kib())
        ),
        value: delivered_rate,
    })
}

// 5. Fan-out.
async fn fanout(ctx: &Ctx, broker: &Broker) -> Result<Figure, Error> {
    let a = &ctx.args;
    let addr = broker.address();
    let count = a.fanout_devices.min(ctx.devices.len());
    let subs = connect_all(
        &ctx.receivers,
        &addr,
        &ctx.devices[..count],
        a.connectors,
        Arc::new(AtomicU64::new(0)),
        |id, mut c| async move {
            let filter = format!("devices/{id}/cmd");
            tokio::time::timeout(CONNECT_TIMEOUT, c.subscribe(&filter, 1))
                .await
                .map_err(|_| format!("{id}: no SUBACK for {filter}"))??;
            Ok((id, c))
        },
    )
    .await?;
    let (ids, subs): (Vec<String>, Vec<Client>) = subs.into_iter().unzip();
    let topics: Vec<String> = ids.iter().map(|id| format!("devices/{id}/cmd")).collect();
    let service = connect(&addr, &ctx.service).await?;
    let base_rss = broker.rss_kib();
    let total = a.fanout_messages * topics.len() as u64;
    let f = flow(
        ctx,
        broker,
        "the fan-out",
        subs,
        vec![service],
        |_, base| PublishPlan {
            topics: topics.clone(),
            size: a.fanout_size,
            window: a.fanout_window,
            rate: None,
            offset: Duration::ZERO,
            limit: Some(total),
            // Bounded by the progress watch, not by a guess at how long it takes.
            stop: base + Duration::from_secs(24 * 3600),
            drain_until: base + Duration::from_secs(24 * 3600),
            base,
        },
        false,
    )
    .await?;
    let mib_s = f.bytes as f64 / (1024.0 * 1024.0) / f.deliver_secs.max(1e-9);
    Ok(Figure {
        cell: format!(
            "**{mib_s:.0} MiB/s** ({} of {} delivered in {:.1} s, {}); peak RSS **{}** (before {}); {}",
            n(f.delivered),
            n(total),
            f.deliver_secs,
            f.lost_note(),
            mib(broker.peak_rss_kib()),
            mib(base_rss),
            cpu_note(f.cpu, f.measured_secs),
        ),
        value: mib_s,
    })
}

/// Checks that `kind` enforces the policy the figures assume: a device's publish to another
/// device's topic is not delivered, its publish to its own is. Both come from one connection,
/// the denied one first, and both brokers keep a publisher's order, so once the allowed one
/// has arrived the denied one would have too.
async fn check_policy(ctx: &Ctx, kind: Kind) -> Result<(), Error> {
    let broker = ctx.start(kind)?;
    let addr = broker.address();
    let (me, other) = match ctx.devices.as_slice() {
        [me, other, ..] => (me, other),
        _ => return Err("the policy check needs two devices (raise --publishers)".into()),
    };
    let mut sub = subscriber(&addr, &ctx.service, &format!("devices/+/{DEVICE_TOPIC}")).await?;
    let mut device = connect(&addr, me).await?;
    let base = Instant::now();
    let seen = Arc::new(Deliveries::default());
    let counted = seen.clone();
    let receiver =
        tokio::spawn(async move { sub.receive_and_ack_batched(base, counted, None).await });
    let far = base + Duration::from_secs(30);
    let plan = PublishPlan {
        topics: vec![device_topic(&other.0), device_topic(&me.0)],
        size: 16,
        window: 2,
        rate: None,
        offset: Duration::ZERO,
        limit: Some(2),
        stop: far,
        drain_until: far,
        base,
    };
    let done = tokio::time::timeout(
        CONNECT_TIMEOUT,
        device.publish_qos1(&plan, &AtomicU64::new(0)),
    )
    .await
    .map_err(|_| format!("{kind}: the policy check's publishes were not acknowledged"))??;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    while seen.count.load(Ordering::Relaxed) == 0 {
        if Instant::now() > deadline || receiver.is_finished() {
            return Err(
                format!("{kind}: a device's publish to its own topic never arrived").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    receiver.abort();
    let delivered = seen.count.load(Ordering::Relaxed);
    if done.acked != 2 || delivered != 1 {
        return Err(format!(
            "{kind} does not enforce the policy: of a device's publishes to another device's \
             topic and to its own ({} acknowledged), {delivered} reached the service, not 1",
            done.acked
        )
        .into());
    }
    Ok(())
}

/// Runs one measure on a fresh broker of `kind`.
async fn measure(ctx: &Ctx, kind: Kind, scenario: Scenario, offered: u64) -> Result<Figure, Error> {
    let broker = ctx.start(kind)?;
    let r = match scenario {
        Scenario::Idle => idle(ctx, &broker).await,
        Scenario::Connects => connects(ctx, &broker).await,
        Scenario::Rate => rate(ctx, &broker, offered).await,
        Scenario::Flat => flat(ctx, &broker).await,
        Scenario::Fanout => fanout(ctx, &broker).await,
    };
    // Mosquitto's log: each distinct message once, with its count (its lines start with a
    // timestamp).
    let mut distinct: Vec<(String, u64)> = Vec::new();
    for line in broker.log_text().lines() {
        // The load generator drops its connections at the end of a measure without a TLS
        // close_notify, and Mosquitto logs each: not a figure of the measure.
        if line.contains("unexpected eof while reading") {
            continue;
        }
        let text = line.split_once(": ").map_or(line, |(_, t)| t);
        if let Some((_, c)) = distinct.iter_mut().find(|(t, _)| t == text) {
            *c += 1;
        } else if distinct.len() < 10 {
            distinct.push((text.to_owned(), 1));
        }
    }
    for (text, count) in distinct {
        eprintln!("{kind}: {count} x {text}");
    }
    if kind == Kind::Gateway && broker.warnings() > 0 {
        eprintln!(
            "gateway: {} warning or error lines in all during this measure",
            broker.warnings()
        );
    }
    r.map_err(|e| format!("{kind}, {}: {e}", value_name(scenario)).into())
}

/// The rows of `scenario` (several for `rate`, one per offered rate).
fn rows_of(args: &Args, scenario: Scenario) -> Vec<(Row, u64)> {
    let a = args;
    let row = |measure: String, ratio_of: &'static str| Row {
        measure,
        ratio_of,
        figures: Vec::new(),
    };
    match scenario {
        Scenario::Idle => vec![(
            row(
                format!("memory per idle mTLS connection, {} held", n(a.idle as u64)),
                "memory",
            ),
            0,
        )],
        Scenario::Connects => vec![(
            row(
                format!(
                    "mTLS connects per second, {} at once, nothing else limiting ({} in all)",
                    a.connectors,
                    n(a.connects as u64)
                ),
                "connects/s",
            ),
            0,
        )],
        Scenario::Rate => a
            .rates
            .iter()
            .map(|r| {
                (
                    row(
                        format!(
                            "QoS 1, {} B, {} device publishers -> 1 service, {} msg/s offered, {} s: p50 / p99",
                            a.size,
                            a.publishers,
                            n(*r),
                            a.seconds
                        ),
                        "p99",
                    ),
                    *r,
                )
            })
            .collect(),
        Scenario::Flat => vec![(
            row(
                format!(
                    "flat out, {} B, {} publishers with {} unacknowledged each -> 1 service, {} s",
                    a.size, a.publishers, a.window, a.seconds
                ),
                "delivered/s",
            ),
            0,
        )],
        Scenario::Fanout => vec![(
            row(
                format!(
                    "fan-out, 1 service -> {} devices' own topics, {} KiB QoS 1, {} each ({} unacknowledged)",
                    a.fanout_devices,
                    a.fanout_size / 1024,
                    n(a.fanout_messages),
                    a.fanout_window
                ),
                "MiB/s",
            ),
            0,
        )],
    }
}

fn print_table(rows: &[Row], kinds: &[Kind]) {
    let name = |k: &Kind| match k {
        Kind::Gateway => "gateway",
        Kind::Mosquitto => "Mosquitto",
    };
    let mut header = "| measure |".to_owned();
    let mut rule = "|---|".to_owned();
    for k in kinds {
        header.push_str(&format!(" {} |", name(k)));
        rule.push_str("---|");
    }
    let both = kinds.contains(&Kind::Gateway) && kinds.contains(&Kind::Mosquitto);
    if both {
        header.push_str(" gateway / Mosquitto |");
        rule.push_str("---|");
    }
    println!("{header}\n{rule}");
    for row in rows {
        let mut line = format!("| {} |", row.measure);
        for k in kinds {
            let cell = row
                .figures
                .iter()
                .find(|(fk, _)| fk == k)
                .map_or("(not measured)", |(_, f)| f.cell.as_str());
            line.push_str(&format!(" {cell} |"));
        }
        if both {
            let value = |k: Kind| {
                row.figures
                    .iter()
                    .find(|(fk, _)| *fk == k)
                    .map(|(_, f)| f.value)
            };
            let ratio = match (value(Kind::Gateway), value(Kind::Mosquitto)) {
                (Some(g), Some(m)) if m > 0.0 && g.is_finite() && m.is_finite() => {
                    format!("{:.2} ({})", g / m, row.ratio_of)
                }
                _ => "-".to_owned(),
            };
            line.push_str(&format!(" {ratio} |"));
        }
        println!("{line}");
    }
}

async fn run(args: Args, receivers: tokio::runtime::Handle) -> Result<(), Error> {
    let kinds: Vec<Kind> = args.brokers.iter().map(|w| Kind::from(*w)).collect();
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(
        &tmp.path().join("pki"),
        &InitOptions {
            devices: 0,
            ..InitOptions::default()
        },
    )?;
    let tls = Tls::from_pki(&pki, &InitOptions::default().gateway_id)?;
    // The policy check needs two devices.
    let mut needed = 2;
    for s in &args.scenarios {
        needed = needed.max(match s {
            Scenario::Idle => args.idle,
            Scenario::Connects => args.connects,
            Scenario::Rate | Scenario::Flat => args.publishers,
            Scenario::Fanout => args.fanout_devices,
        });
    }
    eprintln!("issuing {needed} device certificates...");
    let devices = identities(&pki, "dev-b", needed, Role::Device)?;
    let service = identities(&pki, "svc-bench-", 1, Role::Service)?
        .pop()
        .ok_or("no service identity")?;
    let mosquitto = if kinds.contains(&Kind::Mosquitto) {
        brokers::mosquitto_version()?
    } else {
        "not measured".to_owned()
    };
    let ctx = Ctx {
        args: args.clone(),
        dir: tmp.path().to_owned(),
        tls,
        devices,
        service,
        runs: AtomicUsize::new(0),
        receivers,
    };
    for kind in &kinds {
        check_policy(&ctx, *kind).await?;
        eprintln!("{kind}: policy enforced (a device's publish to another device's topic is not delivered)");
    }
    let mut rows = Vec::new();
    for scenario in &args.scenarios {
        for (mut row, offered) in rows_of(&args, *scenario) {
            for kind in &kinds {
                eprintln!("{kind}: {} ...", row.measure);
                let figure = measure(&ctx, *kind, *scenario, offered).await?;
                eprintln!("{kind}: {}", figure.cell);
                row.figures.push((*kind, figure));
            }
            rows.push(row);
        }
    }
    println!();
    println!("# {}", args.command_line());
    println!(
        "# {} cores shared by the broker under test and this load generator; gateway: release \
         build beside this tool; {mosquitto} ({}), {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        brokers::mosquitto_binary()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        if args.mosquitto_options.is_empty() {
            "its default queue limits"
        } else {
            "with the options above"
        }
    );
    println!();
    print_table(&rows, &kinds);
    Ok(())
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    // Publishers and connectors on two workers; every receiving client (the service, the
    // fan-out's devices) on a runtime of its own, as a real subscriber would be its own
    // process: queued behind a hundred busy publishers, its acknowledgements would come late
    // and the load generator, not the broker, would set the delivered rate.
    let load = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let receiving = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("receivers")
        .enable_all()
        .build()?;
    let receivers = receiving.handle().clone();
    // Brokers are owned inside `run`: an interruption drops it, which kills them.
    load.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(args, receivers) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
            _ = term.recv() => Err("terminated".into()),
        }
    })
}
