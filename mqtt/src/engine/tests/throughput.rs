//! A rough throughput figure for the engine alone (no codec, no sockets): QoS 1 from 100
//! publishers to one subscriber, everyone acknowledging, through routing and transmit. Not a
//! timed test: it prints a figure and asserts only that everything arrived.
//! `cargo test -p fleet-mqtt --release --lib throughput -- --ignored --nocapture`

use std::time::Instant as Clock;

use super::*;

#[test]
#[ignore = "benchmark; run in release with --ignored --nocapture"]
fn throughput_qos1_100_publishers_to_one_subscriber() {
    const PUBLISHERS: u64 = 100;
    const EACH: u16 = 2_000;
    const WINDOW: usize = 16;
    let mut e = Engine::new(Settings::default(), Arc::new(Acl::default()));
    let now = Instant::now();
    let sub = ConnId(1_000);
    e.connect(now, sub, key("svc"), connect_packet("svc", true, None));
    e.packet(now, sub, subscribe(1, &[("dev/+/up", 1)]));
    let topics: Vec<String> = (0..PUBLISHERS).map(|i| format!("dev/{i}/up")).collect();
    for i in 0..PUBLISHERS {
        let id = format!("d{i}");
        e.connect(now, ConnId(i), key(&id), connect_packet(&id, true, None));
    }
    let payload = Bytes::from(vec![7u8; 256]);
    let mut sent = vec![0u16; PUBLISHERS as usize];
    let mut unacked = vec![0usize; PUBLISHERS as usize];
    let mut out = Vec::new();
    let mut delivered = 0u64;
    let total = PUBLISHERS * u64::from(EACH);
    let start = Clock::now();
    while delivered < total {
        for i in 0..PUBLISHERS as usize {
            while unacked[i] < WINDOW && sent[i] < EACH {
                sent[i] += 1;
                unacked[i] += 1;
                let p = Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: topics[i].clone(),
                    packet_id: Some(sent[i]),
                    payload: payload.clone(),
                });
                e.packet(now, ConnId(i as u64), p);
            }
        }
        while e.poll_action().is_some() {}
        out.clear();
        e.transmit(sub, usize::MAX, &mut out);
        for p in out.drain(..) {
            if let Packet::Publish(Publish {
                packet_id: Some(id),
                ..
            }) = p
            {
                delivered += 1;
                e.packet(now, sub, Packet::PubAck(id));
            }
        }
        for (i, unacked) in unacked.iter_mut().enumerate() {
            out.clear();
            e.transmit(ConnId(i as u64), usize::MAX, &mut out);
            *unacked -= out
                .iter()
                .filter(|p| matches!(p, Packet::PubAck(_)))
                .count();
        }
        while e.poll_action().is_some() {}
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{total} QoS 1 messages routed, delivered and acknowledged in {secs:.3} s: {:.0} msg/s",
        total as f64 / secs
    );
    assert_eq!(delivered, total);
}
