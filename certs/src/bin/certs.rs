//! `certs`: create and manage the fleet's development PKI.
//!
//! ```text
//! certs init --dir pki --devices 3      CA, CRL, gateway/service/device certificates, signing key
//! certs issue device dev-0042           one more certificate
//! certs revoke dev-0002                 revoke and rewrite the CRL
//! certs inspect pki/devices/dev-0001.crt
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_certs::identity::{Identity, IdentityPolicy, Role};
use fleet_certs::inspect::describe_file;
use fleet_certs::pki::{InitOptions, Pki};
use fleet_certs::profile::{ServerNames, Validity};
use fleet_certs::TrustStore;

#[derive(Parser)]
#[command(
    name = "certs",
    version,
    about = "Fleet PKI: CA, device/service/gateway certificates, CRL, update-signing key"
)]
struct Cli {
    /// PKI directory.
    #[arg(long, global = true, env = "FLEET_PKI_DIR", default_value = "pki")]
    dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a development PKI in one step: fleet CA (ECDSA P-256), gateway server
    /// certificate (localhost, 127.0.0.1), one service certificate, N device certificates,
    /// an empty CRL and an Ed25519 update-signing key.
    Init {
        /// Number of device certificates (dev-0001, dev-0002, ...).
        #[arg(long, default_value_t = 3)]
        devices: u32,
        /// Id of the gateway certificate.
        #[arg(long, default_value = "gw-0001")]
        gateway_id: String,
        /// Id of the service certificate.
        #[arg(long, default_value = "svc-0001")]
        service_id: String,
        /// Extra DNS name or IP address for the gateway certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity of the leaf certificates in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue a certificate for a device, service or gateway.
    Issue {
        /// The role: device, service or gateway.
        role: Role,
        /// The id (1-64 bytes, no / + # $ or control characters).
        id: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// For a gateway: DNS name or IP address devices reach it by (repeatable;
        /// default localhost and 127.0.0.1).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Revoke the current certificate of ID and rewrite the CRL. Gateways pick the new CRL up
    /// on reload (SIGHUP).
    Revoke {
        /// The id whose certificate to revoke.
        id: String,
    },
    /// Re-sign the CRL with fresh dates (it is valid for a year).
    Crl,
    /// List issued certificates.
    List,
    /// Describe a certificate or CRL file; with --verify, also check it against the PKI's CA
    /// and CRL as the gateway would.
    Inspect {
        /// PEM or DER file.
        file: PathBuf,
        /// Verify the certificate against DIR/ca.crt and DIR/crl.pem.
        #[arg(long)]
        verify: bool,
    },
}

fn server_names(sans: &[String]) -> ServerNames {
    if sans.is_empty() {
        return ServerNames::local();
    }
    let mut names = ServerNames::default();
    for s in sans {
        match s.parse::<IpAddr>() {
            Ok(ip) => names.ips.push(ip),
            Err(_) => names.dns.push(s.clone()),
        }
    }
    names
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let dir = cli.dir.as_path();
    match cli.command {
        Command::Init {
            devices,
            gateway_id,
            service_id,
            sans,
            days,
        } => {
            let mut names = server_names(&sans);
            if !sans.is_empty() {
                // Extra names add to the local ones: a dev gateway is always reachable locally.
                let local = ServerNames::local();
                names.dns.extend(local.dns);
                names.ips.extend(local.ips);
            }
            let opts = InitOptions {
                devices,
                gateway_id,
                service_id,
                gateway_names: names,
                leaf_days: days,
                ..InitOptions::default()
            };
            let pki = Pki::init(dir, &opts)?;
            println!("Created a development PKI in {}", dir.display());
            println!(
                "  CA certificate       {}",
                Pki::ca_cert_path(dir).display()
            );
            println!("  CRL                  {}", pki.crl_path().display());
            println!(
                "  update-signing key   {} (public: {})",
                pki.signing_key_path().display(),
                pki.signing_pub_path().display()
            );
            println!(
                "  root of trust        {} (keys in {}: root 2 of 3, updates = the update-signing key, commands 1 of 1)",
                pki.trust().root_path().display(),
                pki.trust().dir().display()
            );
            print_entries(&pki);
        }
        Command::Issue {
            role,
            id,
            days,
            sans,
        } => {
            let mut pki = Pki::open(dir)?;
            let identity = Identity::new(role, id)?;
            let names = if role == Role::Gateway {
                server_names(&sans)
            } else {
                ServerNames::default()
            };
            let e = pki.issue(&identity, Validity::days_from_now(days), &names)?;
            println!(
                "Issued {} {}: {} (key {}), serial {}",
                e.role,
                e.id,
                pki.cert_path(&e).display(),
                pki.key_path(&e).display(),
                e.serial
            );
        }
        Command::Revoke { id } => {
            let mut pki = Pki::open(dir)?;
            let e = pki.revoke(&id)?;
            println!(
                "Revoked {} {} (serial {}); CRL rewritten: {}",
                e.role,
                e.id,
                e.serial,
                pki.crl_path().display()
            );
            println!("Send SIGHUP to running gateways to apply it.");
        }
        Command::Crl => {
            let mut pki = Pki::open(dir)?;
            println!("CRL rewritten: {}", pki.write_crl()?.display());
        }
        Command::List => print_entries(&Pki::open(dir)?),
        Command::Inspect { file, verify } => {
            print!("{}", describe_file(&file)?);
            if verify {
                verify_file(dir, &file)?;
            }
        }
    }
    Ok(())
}

fn verify_file(dir: &Path, file: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let crl = dir.join("crl.pem");
    let store = TrustStore::from_files(
        &Pki::ca_cert_path(dir),
        Some(&crl).filter(|p| p.exists()).map(PathBuf::as_path),
        IdentityPolicy::default(),
    )?;
    let certs = fleet_certs::files::read_certs(file)?;
    for c in &certs {
        let identity = store.verify_client(c, rustls_pki_types::UnixTime::now())?;
        println!("  verified:   accepted as {identity}");
    }
    Ok(())
}

fn print_entries(pki: &Pki) {
    for e in pki.entries() {
        let state = if e.revoked_at.is_some() {
            "revoked"
        } else {
            "valid"
        };
        println!(
            "  {:<8} {:<20} {:<8} {}",
            e.role.as_str(),
            e.id,
            state,
            pki.cert_path(e).display()
        );
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("certs: error: {e}");
            ExitCode::FAILURE
        }
    }
}
