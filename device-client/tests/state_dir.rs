//! One client per state directory: a second one on the same directory is refused with a clear
//! error until the first has shut down.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use device_client::{ClientError, Commands, DeviceClient};

/// A client on `dir` for a gateway nobody listens on (it keeps trying in the background).
fn start(dir: &Path) -> Result<(DeviceClient, Commands), ClientError> {
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
        .start()
}

#[tokio::test]
async fn a_second_client_on_one_state_directory_is_refused_until_the_first_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (first, first_commands) = start(&state).unwrap();

    let err = start(&state).err().expect("a second owner was let in");
    match &err {
        ClientError::StateDirInUse(d) => assert_eq!(d, &state),
        other => panic!("wrong error: {other}"),
    }
    assert!(
        err.to_string().contains(&state.display().to_string()),
        "{err}"
    );
    // Another directory is another device: not affected.
    let (other, _other_commands) = start(&dir.path().join("other")).unwrap();
    other.shutdown().await;

    // Shut down (the handle still alive, as in a restart loop): the directory is free, and
    // the old handle no longer writes to it.
    first.shutdown().await;
    let (second, _commands) = start(&state).unwrap();
    assert!(matches!(
        first.report(Default::default()).await,
        Err(ClientError::Stopped)
    ));
    second.report(Default::default()).await.unwrap();
    second.shutdown().await;
    drop((first, first_commands, second));

    // Dropped after shutdown: free too.
    let (third, _commands) = start(&state).unwrap();
    third.shutdown().await;
}
