//! Certificates for TLS tests, made with the `openssl` command the way an operator makes them
//! for QEMU: a CA, a server pair and a client pair in one directory in QEMU's x509 layout
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`), which `qemu-nbd --object tls-creds-x509,dir=DIR,...`,
//! `qemu-storage-daemon` and ferry's `--tls-creds DIR` all read. A second, unrelated CA
//! ([`Pki::foreign`]) makes the wrong-CA cases.
//!
//! Keys are ECDSA P-256 (quick to make, which RSA is not on a loaded machine); the
//! certificates carry the key usages and purposes QEMU's GnuTLS checks (`CA:TRUE` and
//! `keyCertSign` on the CA; `digitalSignature,keyEncipherment` and `serverAuth` or
//! `clientAuth` on the pairs).

use anyhow::{ensure, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The CA's certificate, which both ends trust.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The CA's key (kept in the directory: QEMU ignores it; tests sign more pairs with it).
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
pub const CLIENT_CERT_FILE: &str = "client-cert.pem";
pub const CLIENT_KEY_FILE: &str = "client-key.pem";

/// How long the certificates are valid: long enough for any test run.
const VALID_DAYS: &str = "3";

/// The names the certificates carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiNames {
    /// The CA's common name.
    pub ca_cn: String,
    /// The server certificate's common name.
    pub server_cn: String,
    /// The server certificate's subject alternative names, as openssl writes them
    /// (`DNS:localhost`, `IP:127.0.0.1`): what a client checks the name it connected to
    /// against.
    pub server_sans: Vec<String>,
    /// The client certificate's common name (what `--tls-authz` and QEMU's `tls-authz`
    /// lists match), also given as its DNS subject alternative name.
    pub client_cn: String,
}

impl Default for PkiNames {
    /// A server known as `localhost` and `127.0.0.1` (TCP on loopback, and unix sockets,
    /// whose server name is `localhost`), a client named `client`.
    fn default() -> Self {
        Self {
            ca_cn: "ferry test CA".into(),
            server_cn: "localhost".into(),
            server_sans: vec!["DNS:localhost".into(), "IP:127.0.0.1".into()],
            client_cn: "client".into(),
        }
    }
}

/// A CA with a server pair and a client pair, in QEMU's layout in one directory.
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
    names: PkiNames,
}

impl Pki {
    /// Makes the CA and both pairs with the default names in `dir` (created if missing).
    pub fn new(dir: &Path) -> Result<Self> {
        Self::with_names(dir, PkiNames::default())
    }

    /// Makes the CA and both pairs with `names` in `dir` (created if missing).
    pub fn with_names(dir: &Path, names: PkiNames) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let pki = Self {
            dir: dir.to_path_buf(),
            names,
        };
        pki.make_ca()?;
        let sans = pki.names.server_sans.join(",");
        pki.issue("server", &pki.names.server_cn, "serverAuth", &sans)?;
        let client_san = format!("DNS:{}", pki.names.client_cn);
        pki.issue("client", &pki.names.client_cn, "clientAuth", &client_san)?;
        Ok(pki)
    }

    /// Another CA with pairs of the same names in `dir`: certificates that look right but
    /// that this CA did not sign, and a CA that did not sign this one's.
    pub fn foreign(&self, dir: &Path) -> Result<Self> {
        let names = PkiNames {
            ca_cn: format!("{} (foreign)", self.names.ca_cn),
            ..self.names.clone()
        };
        Self::with_names(dir, names)
    }

    /// The directory to give as `--tls-creds` or `tls-creds-x509,dir=`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn names(&self) -> &PkiNames {
        &self.names
    }

    /// A directory holding only this CA and the client pair (what a client host has).
    pub fn client_only(&self, dir: &Path) -> Result<PathBuf> {
        self.copy_files(dir, &[CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE])
    }

    /// A directory holding only this CA and the server pair (what a server host has).
    pub fn server_only(&self, dir: &Path) -> Result<PathBuf> {
        self.copy_files(dir, &[CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE])
    }

    fn copy_files(&self, dir: &Path, files: &[&str]) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for file in files {
            std::fs::copy(self.dir.join(file), dir.join(file))
                .with_context(|| format!("copy {file} to {}", dir.display()))?;
        }
        Ok(dir.to_path_buf())
    }

    fn make_ca(&self) -> Result<()> {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            CA_KEY_FILE,
            "-out",
            CA_CERT_FILE,
            "-days",
            VALID_DAYS,
            "-subj",
            &format!("/CN={}", self.names.ca_cn),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
    }

    /// Makes `ROLE-key.pem` and `ROLE-cert.pem` signed by the CA.
    fn issue(&self, role: &str, cn: &str, purpose: &str, sans: &str) -> Result<()> {
        let ext_file = format!("{role}.ext");
        std::fs::write(
            self.dir.join(&ext_file),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={purpose}\nsubjectAltName={sans}\n"
            ),
        )
        .with_context(|| format!("write {ext_file}"))?;
        let key = format!("{role}-key.pem");
        let csr = format!("{role}.csr");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/O=ferry tests/CN={cn}"),
        ])?;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            CA_CERT_FILE,
            "-CAkey",
            CA_KEY_FILE,
            "-CAcreateserial",
            "-out",
            &format!("{role}-cert.pem"),
            "-days",
            VALID_DAYS,
            "-extfile",
            &ext_file,
        ])
    }

    fn openssl(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .context("run openssl (is it installed?)")?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_qemus_layout_and_a_foreign_ca() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path())?;
        for file in [
            CA_CERT_FILE,
            SERVER_CERT_FILE,
            SERVER_KEY_FILE,
            CLIENT_CERT_FILE,
            CLIENT_KEY_FILE,
        ] {
            ensure!(dir.path().join(file).is_file(), "{file} is missing");
        }
        let verify = |ca: &Path, cert: &Path| -> Result<bool> {
            let status = Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(ca)
                .arg(cert)
                .output()?
                .status;
            Ok(status.success())
        };
        let ca = pki.dir().join(CA_CERT_FILE);
        ensure!(verify(&ca, &pki.dir().join(SERVER_CERT_FILE))?);
        ensure!(verify(&ca, &pki.dir().join(CLIENT_CERT_FILE))?);
        let other = tempfile::tempdir()?;
        let foreign = pki.foreign(other.path())?;
        ensure!(!verify(&ca, &foreign.dir().join(CLIENT_CERT_FILE))?);
        let client = pki.client_only(&dir.path().join("client"))?;
        ensure!(!client.join(SERVER_KEY_FILE).exists());
        ensure!(client.join(CLIENT_KEY_FILE).is_file());
        Ok(())
    }
}
