//! TLS for ferry's network connections (the NBD server and client, the control protocol over
//! TCP, the links between ferry daemons): credentials read from a directory in QEMU's x509
//! layout, TLS 1.3 only, both ends presenting certificates signed by the directory's CA, and
//! the allow-list of peer names an operator sets with `--tls-authz`.
//!
//! QEMU's layout (`-object tls-creds-x509,dir=DIR`, and `qemu-nbd --tls-creds`): `ca-cert.pem`
//! (the CA both ends trust), `server-cert.pem` and `server-key.pem` (presented when ferry
//! accepts connections), `client-cert.pem` and `client-key.pem` (presented when ferry
//! connects). A directory may hold only the server pair or only the client pair; the side
//! that is missing is refused when it is asked for, naming the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The CA certificate both ends trust.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The certificate ferry presents as a server, and its key.
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// The certificate ferry presents as a client, and its key.
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

/// Why credentials could not be used. Each names the directory and, where one is at fault,
/// the file: these are operator errors, reported in one line.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS credentials {dir}: {file} is missing (QEMU's x509 layout: {CA_CERT_FILE}, {SERVER_CERT_FILE}, {SERVER_KEY_FILE}, {CLIENT_CERT_FILE}, {CLIENT_KEY_FILE})")]
    Missing { dir: PathBuf, file: &'static str },
    #[error("TLS credentials {dir}: cannot read {file}: {reason}")]
    Unreadable {
        dir: PathBuf,
        file: &'static str,
        reason: String,
    },
    #[error("TLS credentials {dir}: {reason}")]
    Unusable { dir: PathBuf, reason: String },
    #[error("bad TLS server name {name:?}: {reason}")]
    ServerName { name: String, reason: String },
}

/// A certificate chain and the key of its first certificate.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    fn clone_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// Credentials loaded from one directory; cheap to share (`Arc`).
pub struct TlsCredentials {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    server: Option<Identity>,
    client: Option<Identity>,
}

impl fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("dir", &self.dir)
            .field("server", &self.server.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// The crypto provider every configuration is built with: ring, whose build needs only a C
/// compiler. rustls deprecates its `default_provider` because ring has no post-quantum key
/// exchange; ferry's peers (ferry, QEMU's GnuTLS, libnbd) agree on X25519 or P-256 with it.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Credentials compare by the directory they were read from (settings that name the same
/// directory are the same setting).
impl PartialEq for TlsCredentials {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir
    }
}

impl Eq for TlsCredentials {}

impl TlsCredentials {
    /// Reads `dir`: the CA certificate must be there, and at least one of the server and
    /// client pairs (both files of a pair, or neither).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(dir)?;
        let server = load_identity(dir, SERVER_CERT_FILE, SERVER_KEY_FILE)?;
        let client = load_identity(dir, CLIENT_CERT_FILE, CLIENT_KEY_FILE)?;
        if server.is_none() && client.is_none() {
            return Err(TlsError::Missing {
                dir: dir.to_path_buf(),
                file: SERVER_CERT_FILE,
            });
        }
        let credentials = Self {
            dir: dir.to_path_buf(),
            roots: Arc::new(roots),
            server,
            client,
        };
        // Build both configurations once so that a key that does not match its
        // certificate is reported at load, not at the first connection.
        if credentials.server.is_some() {
            credentials.server_config()?;
        }
        if credentials.client.is_some() {
            credentials.client_config()?;
        }
        Ok(credentials)
    }

    /// The directory the credentials were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the directory holds the server pair.
    pub fn can_serve(&self) -> bool {
        self.server.is_some()
    }

    /// True when the directory holds the client pair.
    pub fn can_connect(&self) -> bool {
        self.client.is_some()
    }

    fn unusable(&self, reason: impl fmt::Display) -> TlsError {
        TlsError::Unusable {
            dir: self.dir.clone(),
            reason: reason.to_string(),
        }
    }

    /// The configuration for accepting connections: TLS 1.3, the server pair presented, and
    /// a client certificate signed by the CA required of every client.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let identity = self.server.as_ref().ok_or_else(|| TlsError::Missing {
            dir: self.dir.clone(),
            file: SERVER_CERT_FILE,
        })?;
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| self.unusable(format!("{CA_CERT_FILE}: {e}")))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.unusable(e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.chain.clone(), identity.clone_key())
            .map_err(|e| self.unusable(format!("{SERVER_CERT_FILE}/{SERVER_KEY_FILE}: {e}")))?;
        Ok(Arc::new(config))
    }

    /// The configuration for connecting: TLS 1.3, the server's certificate checked against
    /// the CA and the name connected to, the client pair presented.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let identity = self.client.as_ref().ok_or_else(|| TlsError::Missing {
            dir: self.dir.clone(),
            file: CLIENT_CERT_FILE,
        })?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.unusable(e))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(identity.chain.clone(), identity.clone_key())
            .map_err(|e| self.unusable(format!("{CLIENT_CERT_FILE}/{CLIENT_KEY_FILE}: {e}")))?;
        Ok(Arc::new(config))
    }
}

fn read_file(dir: &Path, file: &'static str) -> Result<Option<Vec<u8>>, TlsError> {
    match std::fs::read(dir.join(file)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TlsError::Unreadable {
            dir: dir.to_path_buf(),
            file,
            reason: e.to_string(),
        }),
    }
}

fn certificates(
    dir: &Path,
    file: &'static str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Unreadable {
            dir: dir.to_path_buf(),
            file,
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Unreadable {
            dir: dir.to_path_buf(),
            file,
            reason: "no certificate in it".into(),
        });
    }
    Ok(chain)
}

fn load_roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let pem = read_file(dir, CA_CERT_FILE)?.ok_or_else(|| TlsError::Missing {
        dir: dir.to_path_buf(),
        file: CA_CERT_FILE,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in certificates(dir, CA_CERT_FILE, &pem)? {
        roots.add(cert).map_err(|e| TlsError::Unreadable {
            dir: dir.to_path_buf(),
            file: CA_CERT_FILE,
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Both files of a pair, neither (`None`), or an error naming the one that is missing.
fn load_identity(
    dir: &Path,
    cert_file: &'static str,
    key_file: &'static str,
) -> Result<Option<Identity>, TlsError> {
    let cert = read_file(dir, cert_file)?;
    let key = read_file(dir, key_file)?;
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(TlsError::Missing {
                dir: dir.to_path_buf(),
                file: key_file,
            })
        }
        (None, Some(_)) => {
            return Err(TlsError::Missing {
                dir: dir.to_path_buf(),
                file: cert_file,
            })
        }
        (Some(cert), Some(key)) => (cert, key),
    };
    let chain = certificates(dir, cert_file, &cert)?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| TlsError::Unreadable {
        dir: dir.to_path_buf(),
        file: key_file,
        reason: e.to_string(),
    })?;
    Ok(Some(Identity { chain, key }))
}

/// The name a client checks the server's certificate against: a DNS name or an IP address
/// (the certificate must carry it as a subject alternative name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| TlsError::ServerName {
        name: host.to_string(),
        reason: e.to_string(),
    })
}

/// The names a certificate is known by, for `--tls-authz` and for messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// The subject's distinguished name in RFC 4514 form, most significant part last
    /// (`CN=client,O=Example`), as QEMU's `tls-authz` lists spell it.
    pub distinguished_name: String,
    /// The subject's common names.
    pub common_names: Vec<String>,
    /// The DNS names of the subject alternative name extension.
    pub dns_names: Vec<String>,
}

impl PeerIdentity {
    /// Reads the names of a DER certificate; `None` when it does not parse (rustls has
    /// verified it by then, so that does not happen for a connected peer).
    pub fn of(cert: &CertificateDer<'_>) -> Option<Self> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
        let subject = parsed.subject();
        let mut parts = Vec::new();
        for rdn in subject.iter().collect::<Vec<_>>().into_iter().rev() {
            for attribute in rdn.iter() {
                let value = attribute.as_str().unwrap_or("?");
                let key = x509_parser::objects::oid2abbrev(
                    attribute.attr_type(),
                    x509_parser::objects::oid_registry(),
                )
                .map(str::to_string)
                .unwrap_or_else(|_| attribute.attr_type().to_id_string());
                parts.push(format!("{key}={}", escape_dn_value(value)));
            }
        }
        let common_names = subject
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect();
        let mut dns_names = Vec::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(dns) = name {
                    dns_names.push((*dns).to_string());
                }
            }
        }
        Some(Self {
            distinguished_name: parts.join(","),
            common_names,
            dns_names,
        })
    }

    /// The name to show in logs and status: the first common name, or the DN.
    pub fn display_name(&self) -> &str {
        self.common_names
            .first()
            .map(String::as_str)
            .unwrap_or(&self.distinguished_name)
    }
}

/// Escapes the characters RFC 4514 reserves in an attribute value.
fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let leading = i == 0 && (c == ' ' || c == '#');
        if leading || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The peers allowed in (`--tls-authz NAME[,NAME...]`): a peer is allowed when one of its
/// common names, DNS names or its whole distinguished name equals one of the names.
/// Without an allow-list every certificate the CA signed is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsAuthz {
    names: Vec<String>,
}

impl TlsAuthz {
    /// Parses a comma-separated list; a distinguished name, which contains commas itself, is
    /// given in its own `--tls-authz` (see [`TlsAuthz::add`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut authz = Self::default();
        for name in text.split(',').map(str::trim) {
            authz.add(name)?;
        }
        Ok(authz)
    }

    /// Reads the values of repeated `--tls-authz` options: each is a comma-separated list
    /// of names, except that a value with a `=` in it is one distinguished name
    /// (`CN=client,O=Example`), whose commas are its own.
    pub fn from_options(values: &[String]) -> Result<Self, String> {
        let mut authz = Self::default();
        for value in values {
            if value.contains('=') {
                authz.add(value)?;
            } else {
                for name in value.split(',') {
                    authz.add(name)?;
                }
            }
        }
        Ok(authz)
    }

    /// Adds one name (a whole distinguished name included).
    pub fn add(&mut self, name: &str) -> Result<(), String> {
        let name = name.trim();
        if name.is_empty() {
            return Err("an empty name in --tls-authz".into());
        }
        self.names.push(name.to_string());
        Ok(())
    }

    /// True when no list was given.
    pub fn allows_all(&self) -> bool {
        self.names.is_empty()
    }

    /// Checks a verified peer's certificate; the error says which name was refused.
    pub fn check(&self, peer: &PeerIdentity) -> Result<(), String> {
        if self.allows_all() {
            return Ok(());
        }
        let known = std::iter::once(&peer.distinguished_name)
            .chain(&peer.common_names)
            .chain(&peer.dns_names);
        for name in known {
            if self.names.iter().any(|allowed| allowed == name) {
                return Ok(());
            }
        }
        Err(format!(
            "client certificate {:?} is not in --tls-authz",
            peer.distinguished_name
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests;
