//! Certificates for TLS tests, made with the `openssl` command the way an operator makes
//! them for QEMU (RSA keys, the key usages GnuTLS checks), in QEMU's x509 layout:
//! `ca-cert.pem`, `server-cert.pem`/`server-key.pem`, `client-cert.pem`/`client-key.pem`.
//!
//! A server certificate names `localhost` and `127.0.0.1` (DNS and IP subject alternative
//! names), so clients may connect by either. A test that needs a foreign CA makes a second
//! [`Ca`] and issues the client's pair from it.

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Days the certificates are valid.
const VALID_DAYS: &str = "3";

/// Which end a certificate is for: its file names and its extended key usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

impl Role {
    fn file_stem(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Client => "client",
        }
    }

    fn usage(self) -> &'static str {
        match self {
            Self::Server => "serverAuth",
            Self::Client => "clientAuth",
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl (is it installed?)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A certificate authority: its key and self-signed certificate in a directory of its own.
#[derive(Debug, Clone)]
pub struct Ca {
    dir: PathBuf,
}

impl Ca {
    /// Makes a CA named `name` in `dir` (created if missing).
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                VALID_DAYS,
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The CA's certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// Issues a `role` pair for common name `cn` into `out` (created if missing), with
    /// this CA's certificate beside it as `ca-cert.pem`.
    pub fn issue(&self, out: &Path, role: Role, cn: &str) -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
        let stem = role.file_stem();
        let ext = self.dir.join(format!("{stem}-{cn}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={}\nsubjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1\n",
                role.usage()
            ),
        )?;
        let key = out.join(format!("{stem}-key.pem"));
        let cert = out.join(format!("{stem}-cert.pem"));
        let csr = self.dir.join(format!("{stem}-{cn}.csr"));
        let path = |p: &Path| p.to_string_lossy().into_owned();
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &path(&key),
                "-out",
                &path(&csr),
                "-subj",
                &format!("/O=ferry tests/CN={cn}"),
            ],
        )?;
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &path(&csr),
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &path(&cert),
                "-days",
                VALID_DAYS,
                "-extfile",
                &path(&ext),
            ],
        )?;
        std::fs::copy(self.cert(), out.join("ca-cert.pem"))?;
        Ok(())
    }
}

/// Credentials for both ends in one directory `dir`: a new CA (in `dir/ca`), a server pair
/// for `localhost`/`127.0.0.1` and a client pair for `client_cn`.
pub fn credentials(dir: &Path, client_cn: &str) -> Result<Ca> {
    let ca = Ca::new(&dir.join("ca"), "ferry test CA")?;
    ca.issue(dir, Role::Server, "localhost")?;
    ca.issue(dir, Role::Client, client_cn)?;
    Ok(ca)
}
