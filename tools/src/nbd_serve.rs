//! `ferry serve`'s NBD server: its options (`--nbd-listen`, `--insecure`,
//! `--nbd-max-connections`, or the same keys in the TOML file; TLS from the daemon's
//! `--tls-creds` and `--tls-authz`), their checks before anything is created, and the server
//! the daemon exports its `nbd=rw|ro` volumes on, each under its name.

use std::sync::Arc;

use anyhow::{bail, Context};
use ferry_engine::nbd::server::{CONNECTIONS_MAX_DEFAULT, CONNECTIONS_MAX_LIMIT};
use ferry_engine::nbd::{ListenAddress, NbdServer, ServerOptions};
use ferry_engine::tls::{TlsAuthz, TlsCredentials};

use crate::volume_spec::VolumeSpec;

/// The NBD options of `ferry serve`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct NbdArgs {
    /// Serve volumes with nbd=rw|ro over NBD on ADDR: HOST:PORT or unix:PATH (repeatable).
    /// With --tls-creds every client must use TLS (and pass --tls-authz); plaintext on
    /// anything but loopback or a unix socket needs --insecure.
    #[arg(long = "nbd-listen", value_name = "ADDR")]
    pub listen: Vec<String>,
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
            ("insecure", toml::Value::Boolean(b)) => self.args.insecure = *b,
            ("nbd-max-connections", toml::Value::Integer(n)) => {
                self.args.max_connections =
                    Some(usize::try_from(*n).map_err(|_| format!("{key}: expected a count"))?)
            }
            ("insecure" | "nbd-max-connections", other) => {
                return Err(format!("{key}: unsupported value {other}"))
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Merges the file's settings and the flags (flags win) and checks them: the addresses
/// parse, plaintext listens only on loopback or unix sockets unless `--insecure` (`tls`:
/// the daemon has `--tls-creds`, which makes every NBD client use TLS), and a volume
/// exported over NBD has a listener.
pub fn plan(
    file: &NbdToml,
    flags: &NbdArgs,
    volumes: &[VolumeSpec],
    tls: bool,
) -> anyhow::Result<NbdPlan> {
    let file = &file.args;
    let listen_texts = if flags.listen.is_empty() {
        &file.listen
    } else {
        &flags.listen
    };
    let insecure = flags.insecure || file.insecure;
    let mut listen = Vec::new();
    for text in listen_texts {
        let address =
            ListenAddress::parse(text).map_err(|e| anyhow::anyhow!("--nbd-listen {e}"))?;
        if !tls && !insecure && !address.is_local() {
            bail!(
                "--nbd-listen {text}: plaintext NBD on an address other than loopback needs \
                 --tls-creds DIR (or --insecure)"
            );
        }
        listen.push(address);
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
        max_connections,
    })
}

/// The NBD server of a plan, with no export and no listener yet (nothing when no listener
/// is asked for); with credentials it presents their server pair, which is checked here,
/// before anything is created.
pub fn server(
    plan: &NbdPlan,
    credentials: Option<&Arc<TlsCredentials>>,
    authz: &TlsAuthz,
) -> anyhow::Result<Option<Arc<NbdServer>>> {
    if plan.listen.is_empty() {
        return Ok(None);
    }
    let server = NbdServer::new(ServerOptions {
        tls: credentials.cloned(),
        authz: authz.clone(),
        connections_max: plan.max_connections,
        ..ServerOptions::default()
    })?;
    Ok(Some(Arc::new(server)))
}

/// Binds the plan's listeners (once the volumes are exported, so that the first client
/// finds them).
pub fn listen(server: &NbdServer, plan: &NbdPlan) -> anyhow::Result<()> {
    for address in &plan.listen {
        server
            .listen(address)
            .with_context(|| format!("--nbd-listen {address}"))?;
        // A unix listener is a socket file like the volumes': the same mode and group.
        if let ListenAddress::Unix { path } = address {
            crate::identity::apply_socket_access(path)?;
        }
    }
    Ok(())
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
        let local = flags(&["127.0.0.1:10809", "unix:/tmp/x", "[::1]:1"]);
        plan(&none, &local, &[], false)?;
        let err = plan(&none, &flags(&["0.0.0.0:10809"]), &[], false).err();
        assert!(err.is_some_and(|e| e
            .to_string()
            .contains("needs --tls-creds DIR (or --insecure)")));
        let mut insecure = flags(&["0.0.0.0:10809"]);
        insecure.insecure = true;
        assert_eq!(plan(&none, &insecure, &[], false)?.listen.len(), 1);
        plan(&none, &flags(&["0.0.0.0:10809"]), &[], true)?;
        Ok(())
    }

    #[test]
    fn refuses_inconsistent_settings() -> anyhow::Result<()> {
        let none = NbdToml::default();
        let volume = crate::volume_spec::parse_volume("name=v,path=p,socket=s,nbd=rw")
            .map_err(anyhow::Error::msg)?;
        let err = plan(&none, &flags(&[]), &[volume], false)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("volume v is exported over NBD (nbd=) but there is no --nbd-listen")
        );
        let mut many = flags(&["127.0.0.1:1"]);
        many.max_connections = Some(0);
        assert!(plan(&none, &many, &[], false).is_err());
        assert!(plan(&none, &flags(&["nohost"]), &[], false).is_err());
        Ok(())
    }

    #[test]
    fn reads_the_toml_keys_and_flags_win() -> anyhow::Result<()> {
        let table: toml::Table =
            "nbd-listen = [\"10.0.0.1:7\"]\nnbd-max-connections = 9\ninsecure = true".parse()?;
        let mut file = NbdToml::default();
        for (key, value) in &table {
            assert!(file.take(key, value).map_err(anyhow::Error::msg)?);
        }
        let control = toml::Value::String("x".into());
        assert!(!file.take("control", &control).map_err(anyhow::Error::msg)?);
        let merged = plan(&file, &NbdArgs::default(), &[], false)?;
        assert_eq!(merged.max_connections, 9);
        assert_eq!(merged.listen.len(), 1);
        let over = plan(&file, &flags(&["127.0.0.1:8"]), &[], false)?;
        let want = ListenAddress::parse("127.0.0.1:8").map_err(anyhow::Error::msg)?;
        assert_eq!(over.listen, vec![want]);
        Ok(())
    }
}
