//! The root of trust at start: the provisioned root must check, the newest root the device
//! accepted (persisted in the state directory) wins over an older provisioned one, and a
//! corrupt persisted root is counted and passed over.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use device_client::{ClientError, DeviceClient, DeviceClientBuilder, ROOT_FILE};
use fleet_proto::signing::UpdateSigner;
use fleet_proto::trust::{build, ROOT_FORMAT_VERSION};
use fleet_proto::v1;
use fleet_proto::Message;

/// A client builder on `dir` for a gateway nobody listens on.
fn builder(dir: &Path) -> DeviceClientBuilder {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    DeviceClient::builder()
        .gateway("localhost", 1)
        .rustls_config(Arc::new(tls), "dev-0001")
        .state_dir(dir)
}

/// Root `version` with `key` in every role, signed by `signer`.
fn root(version: u64, key: &UpdateSigner, signer: &UpdateSigner) -> Vec<u8> {
    let role = build::role(&[key.verifying_key()], 1);
    let r = v1::Root {
        format_version: ROOT_FORMAT_VERSION,
        version,
        expires_at_ms: u64::MAX,
        root: Some(role.clone()),
        updates: Some(role.clone()),
        commands: Some(role),
    };
    let mut s = build::encode(&r);
    build::add_signature(signer, &mut s).unwrap();
    s.encode_to_vec()
}

#[tokio::test]
async fn a_provisioned_root_that_does_not_check_is_a_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = UpdateSigner::generate();
    let stranger = UpdateSigner::generate();
    for bad in [b"not a root".to_vec(), root(1, &key, &stranger)] {
        let err = builder(dir.path()).trust_root(bad).start().err();
        assert!(matches!(err, Some(ClientError::Root(_))), "{err:?}");
    }
    let err = builder(dir.path())
        .trust_root_file(dir.path().join("missing.bin"))
        .start()
        .err();
    assert!(
        matches!(&err, Some(ClientError::Config(m)) if m.contains("missing.bin")),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_newest_root_accepted_wins_and_a_corrupt_one_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key = UpdateSigner::generate();
    // No root: the device runs, holding none.
    let (c, _cmds) = builder(&state).start().unwrap();
    assert_eq!(c.stats().root_version, 0);
    c.shutdown().await;
    // Provisioned v1; v2 persisted (as if accepted in band earlier): v2.
    std::fs::create_dir_all(state.join("trust")).unwrap();
    std::fs::write(state.join(ROOT_FILE), root(2, &key, &key)).unwrap();
    let (c, _cmds) = builder(&state)
        .trust_root(root(1, &key, &key))
        .start()
        .unwrap();
    let s = c.stats();
    assert_eq!(
        (s.root_version, s.root_file_rejected, s.root_expired),
        (2, false, false)
    );
    c.shutdown().await;
    // Corrupt: the provisioned root, and counted.
    std::fs::write(state.join(ROOT_FILE), b"\x0a\xff torn").unwrap();
    let file = dir.path().join("root.bin");
    std::fs::write(&file, root(1, &key, &key)).unwrap();
    let (c, _cmds) = builder(&state).trust_root_file(&file).start().unwrap();
    let s = c.stats();
    assert_eq!((s.root_version, s.root_file_rejected), (1, true));
    c.shutdown().await;
}
