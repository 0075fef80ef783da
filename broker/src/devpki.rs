//! The embedded default: a development PKI in the data directory, created on first start.

use std::path::Path;

use fleet_certs::pki::{InitOptions, Pki, PkiError};

use crate::tls::TlsFiles;

/// Id of the gateway certificate in the development PKI.
pub(crate) const DEV_GATEWAY_ID: &str = "gw-0001";

/// Makes sure `DATA_DIR/pki` holds a development PKI (CA, CRL, gateway, service and `devices`
/// device certificates) and returns the gateway's TLS files from it.
pub fn ensure(data_dir: &Path, devices: u32) -> Result<(TlsFiles, bool), PkiError> {
    let dir = data_dir.join("pki");
    let created = !Pki::ca_cert_path(&dir).exists();
    let pki = if created {
        Pki::init(
            &dir,
            &InitOptions {
                devices,
                gateway_id: DEV_GATEWAY_ID.into(),
                ..InitOptions::default()
            },
        )?
    } else {
        Pki::open(&dir)?
    };
    let gw = pki
        .entry(DEV_GATEWAY_ID)
        .ok_or_else(|| PkiError::UnknownId(DEV_GATEWAY_ID.into()))?;
    let files = TlsFiles {
        ca: Pki::ca_cert_path(&dir),
        crl: Some(pki.crl_path()),
        cert: pki.cert_path(gw),
        key: pki.key_path(gw),
    };
    Ok((files, created))
}
