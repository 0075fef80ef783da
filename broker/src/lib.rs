//! The edge gateway: the mTLS edge with certificate identities and ACLs in front of an
//! embedded rumqttd router, plus the durable services (command outbox, update server,
//! status registry, upstream bridge). Built out by the gateway issues; see `DESIGN.md`.
#![forbid(unsafe_code)]
