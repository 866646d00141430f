//! `ferry serve`'s NBD server: its options (`--nbd-listen`, `--tls-creds`, `--tls-authz`,
//! `--insecure`, `--nbd-max-connections`, or the same keys in the TOML file), their checks
//! before anything is created, and starting the server with the volumes whose spec says
//! `nbd=rw|ro`, each exported under its name.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use ferry_engine::nbd::server::{CONNECTIONS_MAX_DEFAULT, CONNECTIONS_MAX_LIMIT};
use ferry_engine::nbd::{ExportConfig, ListenAddress, NbdServer, ServerOptions};
use ferry_engine::tls::{TlsAuthz, TlsCredentials};
use ferry_engine::Volume;

use crate::volume_spec::{NbdExportMode, VolumeSpec};

/// The NBD options of `ferry serve`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct NbdArgs {
    /// Serve volumes with nbd=rw|ro over NBD on ADDR: HOST:PORT or unix:PATH (repeatable).
    /// Plaintext on anything but loopback or a unix socket needs --insecure.
    #[arg(long = "nbd-listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// TLS credentials in QEMU's x509 layout (ca-cert.pem, server-cert.pem,
    /// server-key.pem); with them every NBD client must use TLS with a certificate the CA
    /// signed.
    #[arg(long = "tls-creds", value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Only clients whose certificate's common name, DNS name or distinguished name is
    /// listed get in (NAME[,NAME...]; repeatable, one distinguished name per option).
    #[arg(long = "tls-authz", value_name = "NAMES")]
    pub tls_authz: Vec<String>,
    /// Allow plaintext NBD on addresses other than loopback.
    #[arg(long)]
    pub insecure: bool,
    /// NBD connections served at once, handshakes included; more are closed at once.
    #[arg(long = "nbd-max-connections", value_name = "N")]
    pub max_connections: Option<usize>,
}

/// The NBD settings after merging the TOML file and the flags, checked.
#[derive(Debug, Clone, Default)]
pub struct NbdPlan {
    pub listen: Vec<ListenAddress>,
    pub tls_creds: Option<PathBuf>,
    pub tls_authz: TlsAuthz,
    pub max_connections: usize,
}

/// The NBD keys of the TOML file, as read.
#[derive(Debug, Clone, Default)]
pub struct NbdToml {
    args: NbdArgs,
}

impl NbdToml {
    /// Takes one top-level key if it is an NBD setting; false when it is not one.
    pub fn take(&mut self, key: &str, value: &toml::Value) -> Result<bool, String> {
        let strings = |value: &toml::Value| -> Result<Vec<String>, String> {
            match value {
                toml::Value::String(s) => Ok(vec![s.clone()]),
                toml::Value::Array(list) => list
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("{key}: expected strings")),
                _ => Err(format!("{key}: expected a string or a list of strings")),
            }
        };
        match (key, value) {
            ("nbd-listen", v) => self.args.listen = strings(v)?,
            ("tls-creds", toml::Value::String(s)) => self.args.tls_creds = Some(s.into()),
            ("tls-authz", v) => self.args.tls_authz = strings(v)?,
            ("insecure", toml::Value::Boolean(b)) => self.args.insecure = *b,
            ("nbd-max-connections", toml::Value::Integer(n)) => {
                self.args.max_connections =
                    Some(usize::try_from(*n).map_err(|_| format!("{key}: expected a count"))?)
            }
            ("tls-creds" | "insecure" | "nbd-max-connections", other) => {
                return Err(format!("{key}: unsupported value {other}"))
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Merges the file's settings and the flags (flags win) and checks them: the addresses
/// parse, plaintext listens only on loopback or unix sockets unless `--insecure`,
/// `--tls-authz` comes with `--tls-creds`, and a volume exported over NBD has a listener.
pub fn plan(file: &NbdToml, flags: &NbdArgs, volumes: &[VolumeSpec]) -> anyhow::Result<NbdPlan> {
    let file = &file.args;
    let pick = |a: &Vec<String>, b: &Vec<String>| if a.is_empty() { b.clone() } else { a.clone() };
    let listen_texts = pick(&flags.listen, &file.listen);
    let authz_texts = pick(&flags.tls_authz, &file.tls_authz);
    let tls_creds = flags.tls_creds.clone().or_else(|| file.tls_creds.clone());
    let insecure = flags.insecure || file.insecure;
    let mut listen = Vec::new();
    for text in &listen_texts {
        let address =
            ListenAddress::parse(text).map_err(|e| anyhow::anyhow!("--nbd-listen {e}"))?;
        if tls_creds.is_none() && !insecure && !address.is_local() {
            bail!(
                "--nbd-listen {text}: plaintext NBD on an address other than loopback needs \
                 --tls-creds DIR (or --insecure)"
            );
        }
        listen.push(address);
    }
    let mut tls_authz = TlsAuthz::default();
    for text in &authz_texts {
        if text.contains('=') {
            // A distinguished name (CN=...,O=...) contains commas: it is one name.
            tls_authz.add(text).map_err(anyhow::Error::msg)?;
        } else {
            for name in text.split(',') {
                tls_authz.add(name).map_err(anyhow::Error::msg)?;
            }
        }
    }
    if !tls_authz.allows_all() && tls_creds.is_none() {
        bail!("--tls-authz needs --tls-creds");
    }
    let max_connections = flags
        .max_connections
        .or(file.max_connections)
        .unwrap_or(CONNECTIONS_MAX_DEFAULT);
    if max_connections == 0 || max_connections > CONNECTIONS_MAX_LIMIT {
        bail!("--nbd-max-connections {max_connections}: expected 1 to {CONNECTIONS_MAX_LIMIT}");
    }
    if listen.is_empty() {
        if let Some(spec) = volumes.iter().find(|v| v.nbd.is_some()) {
            bail!(
                "volume {} is exported over NBD (nbd=) but there is no --nbd-listen",
                spec.engine.name
            );
        }
    }
    Ok(NbdPlan {
        listen,
        tls_creds,
        tls_authz,
        max_connections,
    })
}

/// Loads the TLS credentials of a plan (before anything is created, so that a bad
/// directory is reported first).
pub fn load_credentials(plan: &NbdPlan) -> anyhow::Result<Option<Arc<TlsCredentials>>> {
    let Some(dir) = &plan.tls_creds else {
        return Ok(None);
    };
    let credentials = TlsCredentials::load(dir)?;
    if !plan.listen.is_empty() {
        // The NBD server presents the server pair: fail now if it is missing.
        credentials.server_config()?;
    }
    Ok(Some(Arc::new(credentials)))
}

/// Starts the NBD server with the exported volumes, or nothing when no listener is asked
/// for.
pub fn start(
    plan: &NbdPlan,
    credentials: Option<Arc<TlsCredentials>>,
    volumes: &[(VolumeSpec, Arc<Volume>)],
) -> anyhow::Result<Option<Arc<NbdServer>>> {
    if plan.listen.is_empty() {
        return Ok(None);
    }
    let server = NbdServer::new(ServerOptions {
        tls: credentials,
        authz: plan.tls_authz.clone(),
        connections_max: plan.max_connections,
        ..ServerOptions::default()
    })?;
    for (spec, volume) in volumes {
        let Some(mode) = spec.nbd else { continue };
        server.add_export(ExportConfig {
            name: volume.name().to_string(),
            volume: volume.clone(),
            read_only: mode == NbdExportMode::ReadOnly,
            description: format!("ferry volume {}", volume.name()),
            clients: None,
        })?;
    }
    for address in &plan.listen {
        server
            .listen(address)
            .with_context(|| format!("--nbd-listen {address}"))?;
    }
    Ok(Some(Arc::new(server)))
}

/// The URIs a client reaches an export by (`nbds://` when TLS is required).
pub fn export_uris(server: &NbdServer, export: &str) -> Vec<String> {
    let tls = server.requires_tls();
    server
        .addresses()
        .iter()
        .map(|address| match address {
            ListenAddress::Tcp { host, port } => {
                let scheme = if tls { "nbds" } else { "nbd" };
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                format!("{scheme}://{host}:{port}/{export}")
            }
            ListenAddress::Unix { path } => {
                let scheme = if tls { "nbds+unix" } else { "nbd+unix" };
                format!("{scheme}:///{export}?socket={}", path.display())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(listen: &[&str]) -> NbdArgs {
        NbdArgs {
            listen: listen.iter().map(|s| s.to_string()).collect(),
            ..NbdArgs::default()
        }
    }

    #[test]
    fn plaintext_only_on_loopback_or_unix_unless_insecure() -> anyhow::Result<()> {
        let none = NbdToml::default();
        plan(
            &none,
            &flags(&["127.0.0.1:10809", "unix:/tmp/x", "[::1]:1"]),
            &[],
        )?;
        let err = plan(&none, &flags(&["0.0.0.0:10809"]), &[]).err();
        assert!(err.is_some_and(|e| e
            .to_string()
            .contains("needs --tls-creds DIR (or --insecure)")));
        let mut insecure = flags(&["0.0.0.0:10809"]);
        insecure.insecure = true;
        assert_eq!(plan(&none, &insecure, &[])?.listen.len(), 1);
        let mut tls = flags(&["0.0.0.0:10809"]);
        tls.tls_creds = Some("/nonexistent".into());
        plan(&none, &tls, &[])?;
        Ok(())
    }

    #[test]
    fn refuses_inconsistent_settings() -> anyhow::Result<()> {
        let none = NbdToml::default();
        let mut authz = flags(&["127.0.0.1:1"]);
        authz.tls_authz = vec!["a".into()];
        assert!(plan(&none, &authz, &[]).is_err());
        let volume = crate::volume_spec::parse_volume("name=v,path=p,socket=s,nbd=rw")
            .map_err(anyhow::Error::msg)?;
        let err = plan(&none, &flags(&[]), &[volume])
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("volume v is exported over NBD (nbd=) but there is no --nbd-listen")
        );
        let mut many = flags(&["127.0.0.1:1"]);
        many.max_connections = Some(0);
        assert!(plan(&none, &many, &[]).is_err());
        assert!(plan(&none, &flags(&["nohost"]), &[]).is_err());
        Ok(())
    }

    #[test]
    fn reads_the_toml_keys_and_flags_win() -> anyhow::Result<()> {
        let table: toml::Table = "nbd-listen = [\"127.0.0.1:7\"]\ntls-authz = \"CN=a,O=b\"\n\
             tls-creds = \"/c\"\nnbd-max-connections = 9\ninsecure = true"
            .parse()?;
        let mut file = NbdToml::default();
        for (key, value) in &table {
            assert!(file.take(key, value).map_err(anyhow::Error::msg)?);
        }
        assert!(!file
            .take("control", &toml::Value::String("x".into()))
            .map_err(anyhow::Error::msg)?);
        let merged = plan(&file, &NbdArgs::default(), &[])?;
        assert_eq!(merged.max_connections, 9);
        assert_eq!(merged.tls_creds, Some(PathBuf::from("/c")));
        let peer = ferry_engine::tls::PeerIdentity {
            distinguished_name: "CN=a,O=b".into(),
            ..Default::default()
        };
        assert!(merged.tls_authz.check(&peer).is_ok());
        let over = plan(&file, &flags(&["127.0.0.1:8"]), &[])?;
        assert_eq!(
            over.listen,
            vec![ListenAddress::parse("127.0.0.1:8").map_err(anyhow::Error::msg)?]
        );
        Ok(())
    }
}
