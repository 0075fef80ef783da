//! The `certs` CLI end to end, checked with OpenSSL as an independent implementation:
//! `certs init`, `openssl verify` on every certificate, `certs revoke`, `openssl crl -text`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// How long one `certs` or `openssl` run may take (killed and reported past it).
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `cmd` to completion within [`DEADLINE`] (a program that cannot start fails the test
/// with its command line: is it installed?).
fn output(cmd: &mut Command) -> Output {
    fleet_testkit::run(cmd, DEADLINE)
}

fn run(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn certs(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_certs"));
    c.arg("--dir").arg(dir);
    c
}

fn openssl() -> Command {
    Command::new("openssl")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn init_verify_revoke_with_openssl() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().join("pki");
    run(certs(&dir).args(["init", "--devices", "3"]));

    let ca = dir.join("ca.crt");
    let leaves = [
        "gateways/gw-0001",
        "services/svc-0001",
        "devices/dev-0001",
        "devices/dev-0002",
        "devices/dev-0003",
    ];
    for leaf in leaves {
        let cert = dir.join(format!("{leaf}.crt"));
        let out = run(openssl().arg("verify").arg("-CAfile").arg(&ca).arg(&cert));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(": OK"),
            "{leaf}"
        );
        // Private keys are owner-only; OpenSSL can read them as PKCS#8 EC keys.
        let key = dir.join(format!("{leaf}.key"));
        assert_eq!(mode(&key), 0o600, "{leaf}.key");
        run(openssl().arg("pkey").arg("-in").arg(&key).arg("-noout"));
    }
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("update-signing.key")), 0o600);
    // The signing key is an Ed25519 PKCS#8 key OpenSSL recognises.
    let out = run(openssl()
        .arg("pkey")
        .arg("-in")
        .arg(dir.join("update-signing.key"))
        .arg("-noout")
        .arg("-text"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ED25519"));
    // And the other way round: a key made by OpenSSL loads as an update-signing key, and its
    // public key as OpenSSL writes it is the one we derive.
    let ossl_key = tmp.path().join("ossl-ed25519.key");
    run(openssl()
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&ossl_key));
    let ossl_pub = run(openssl().args(["pkey", "-pubout", "-in"]).arg(&ossl_key));
    let pem = std::fs::read_to_string(&ossl_key).unwrap_or_else(|e| panic!("{e}"));
    let signer =
        fleet_proto::signing::UpdateSigner::from_pkcs8_pem(&pem).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        signer.public_key_pem().ok().as_deref(),
        Some(String::from_utf8_lossy(&ossl_pub.stdout).as_ref())
    );

    // The gateway certificate serves localhost and 127.0.0.1.
    let out = run(openssl()
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
            "-in",
        ])
        .arg(dir.join("gateways/gw-0001.crt")));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "URI:urn:fleet:gateway:gw-0001",
        "TLS Web Server Authentication",
        "TLS Web Client Authentication",
    ] {
        assert!(
            text.contains(want),
            "gateway certificate lacks {want}: {text}"
        );
    }

    // `openssl crl -text` of the current CRL, verified against the CA.
    let crl_text = || {
        let out = run(openssl()
            .args(["crl", "-noout", "-text", "-in"])
            .arg(dir.join("crl.pem"))
            .arg("-CAfile")
            .arg(&ca));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // The fresh CRL is empty and valid for the CA.
    let text = crl_text();
    assert!(text.contains("No Revoked Certificates"), "{text}");
    assert!(text.contains("verify OK"), "{text}");

    // Revoke dev-0002: its serial appears in the CRL, and OpenSSL's CRL check refuses it while
    // dev-0001 still passes.
    run(certs(&dir).args(["revoke", "dev-0002"]));
    let serial = run(openssl()
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(dir.join("devices/dev-0002.crt")));
    let serial = String::from_utf8_lossy(&serial.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_owned();
    assert_eq!(serial.len(), 32, "16-byte serial expected, got {serial}");
    let text = crl_text();
    assert!(
        text.contains(&format!("Serial Number: {serial}")),
        "serial {serial} not in CRL:\n{text}"
    );
    assert!(text.contains("verify OK"), "{text}");

    let crl_check = |leaf: &str| {
        output(
            openssl()
                .args(["verify", "-crl_check", "-CRLfile"])
                .arg(dir.join("crl.pem"))
                .arg("-CAfile")
                .arg(&ca)
                .arg(dir.join(format!("devices/{leaf}.crt"))),
        )
    };
    assert!(crl_check("dev-0001").status.success());
    let revoked = crl_check("dev-0002");
    assert!(!revoked.status.success());
    assert!(
        String::from_utf8_lossy(&revoked.stdout).contains("revoked")
            || String::from_utf8_lossy(&revoked.stderr).contains("revoked")
    );

    // Our own verifier agrees, through the CLI.
    let ok = run(certs(&dir)
        .args(["inspect", "--verify"])
        .arg(dir.join("devices/dev-0001.crt")));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("accepted as device:dev-0001"));
    let refused = output(
        certs(&dir)
            .args(["inspect", "--verify"])
            .arg(dir.join("devices/dev-0002.crt")),
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("CertRevoked"));

    // Revoking twice, an unknown id, or re-initialising are clear errors.
    for args in [
        &["revoke", "dev-0002"][..],
        &["revoke", "nobody"],
        &["init"],
        &["issue", "device", "dev-0001"],
        &["issue", "device", "bad/id"],
        &["issue", "robot", "x"],
    ] {
        let out = output(certs(&dir).args(args));
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!out.stderr.is_empty(), "{args:?} gave no message");
    }

    // A revoked id can be issued again: a new certificate with a new serial that verifies.
    run(certs(&dir).args(["issue", "device", "dev-0002"]));
    assert!(crl_check("dev-0002").status.success());
}
