//! Certificates for tests of TLS, made with the `openssl` command the way an operator makes
//! them for QEMU: a CA, and credential directories in QEMU's x509 layout (`ca-cert.pem`,
//! `server-cert.pem`/`server-key.pem`, `client-cert.pem`/`client-key.pem`) for chosen
//! names and addresses, which ferry's `--tls-creds`, `qemu-nbd --tls-creds` and
//! `qemu-storage-daemon`'s `tls-creds-x509` all read. Keys are ECDSA P-256 (quick to make,
//! taken by rustls and GnuTLS). The pairs carry the key usages QEMU checks when it loads
//! them (`digitalSignature` and `keyEncipherment`: with a critical key usage lacking either,
//! QEMU refuses the certificate); a second `Pki` is another CA, for the wrong-CA cases.

use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Days a test certificate is valid (from now).
const VALID_DAYS: &str = "3";

/// Who a certificate is for: its common name, and the names and addresses a client may
/// connect to it by (its subject alternative names). `localhost` and 127.0.0.1 are always
/// added, so that every credential also works over loopback.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject<'a> {
    pub common_name: &'a str,
    pub dns_names: &'a [&'a str],
    pub ip_addresses: &'a [&'a str],
}

impl<'a> Subject<'a> {
    pub fn named(common_name: &'a str) -> Self {
        Self {
            common_name,
            ..Self::default()
        }
    }
}

/// A test CA in a temporary directory; the credential directories it makes live there too.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes a CA whose certificate's common name is `ca_name`.
    pub fn new(ca_name: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-pki-")
            .tempdir()
            .context("create the PKI directory")?;
        let pki = Self { dir };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            VALID_DAYS,
            "-subj",
            &format!("/CN={ca_name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])?;
        Ok(pki)
    }

    /// The CA's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca-cert.pem")
    }

    /// A directory `name` with the CA certificate and both pairs for `subject`: what a
    /// daemon that accepts and makes connections gives as `--tls-creds`.
    pub fn credentials(&self, name: &str, subject: &Subject) -> Result<PathBuf> {
        let dir = self.credentials_dir(name)?;
        self.issue(&dir, "server", subject, "serverAuth")?;
        self.issue(&dir, "client", subject, "clientAuth")?;
        Ok(dir)
    }

    /// A directory `name` with the CA certificate and a server pair only (a server that
    /// makes no connections of its own).
    pub fn server_credentials(&self, name: &str, subject: &Subject) -> Result<PathBuf> {
        let dir = self.credentials_dir(name)?;
        self.issue(&dir, "server", subject, "serverAuth")?;
        Ok(dir)
    }

    /// A directory `name` with the CA certificate and a client pair only (a command-line
    /// client's `--tls-creds`).
    pub fn client_credentials(&self, name: &str, common_name: &str) -> Result<PathBuf> {
        let dir = self.credentials_dir(name)?;
        self.issue(&dir, "client", &Subject::named(common_name), "clientAuth")?;
        Ok(dir)
    }

    /// Makes the credentials in `dir` trust this CA instead of their own (a peer whose
    /// certificates another CA signed).
    pub fn trust_in(&self, dir: &Path) -> Result<()> {
        std::fs::copy(self.ca_cert(), dir.join("ca-cert.pem"))
            .with_context(|| format!("copy the CA certificate into {}", dir.display()))?;
        Ok(())
    }

    fn credentials_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.path().join(name);
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::copy(self.ca_cert(), dir.join("ca-cert.pem")).context("copy ca-cert.pem")?;
        Ok(dir)
    }

    /// Writes `ROLE-cert.pem` and `ROLE-key.pem` into `dir`, signed by the CA.
    fn issue(&self, dir: &Path, role: &str, subject: &Subject, usage: &str) -> Result<()> {
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        let key = dir.join(format!("{role}-key.pem"));
        let cert = dir.join(format!("{role}-cert.pem"));
        let request = dir.join(format!("{role}.csr"));
        let extensions = dir.join(format!("{role}.ext"));
        let mut names: Vec<String> = vec!["DNS:localhost".into(), "IP:127.0.0.1".into()];
        names.extend(subject.dns_names.iter().map(|n| format!("DNS:{n}")));
        names.extend(subject.ip_addresses.iter().map(|a| format!("IP:{a}")));
        std::fs::write(
            &extensions,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={usage}\nsubjectAltName={}\n",
                names.join(",")
            ),
        )
        .context("write the certificate extensions")?;
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&request)?,
            "-subj",
            &format!("/O=ferry tests/CN={}", subject.common_name),
        ])?;
        let serial = format!(
            "{}{:06}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&request)?,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-set_serial",
            &serial,
            "-days",
            VALID_DAYS,
            "-extfile",
            path_str(&extensions)?,
            "-out",
            path_str(&cert)?,
        ])?;
        let _ = std::fs::remove_file(&request);
        let _ = std::fs::remove_file(&extensions);
        Ok(())
    }

    fn openssl(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .context("run openssl (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_hold_the_qemu_layout_signed_by_the_ca() -> Result<()> {
        let pki = Pki::new("test CA")?;
        let subject = Subject {
            common_name: "host-a",
            dns_names: &["host-a.test"],
            ip_addresses: &["10.77.0.1"],
        };
        let both = pki.credentials("a", &subject)?;
        for file in [
            "ca-cert.pem",
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ] {
            assert!(both.join(file).is_file(), "{file} missing");
        }
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(both.join("server-cert.pem"))
            .output()?;
        let text = String::from_utf8_lossy(&text.stdout);
        for needle in [
            "CN = host-a",
            "DNS:host-a.test",
            "IP Address:10.77.0.1",
            "IP Address:127.0.0.1",
        ] {
            assert!(text.contains(needle), "{needle} not in:\n{text}");
        }
        let verified = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(pki.ca_cert())
            .arg(both.join("client-cert.pem"))
            .output()?;
        assert!(verified.status.success(), "{verified:?}");
        let client = pki.client_credentials("c", "operator")?;
        assert!(client.join("client-cert.pem").is_file());
        assert!(!client.join("server-cert.pem").exists());
        let server = pki.server_credentials("s", &Subject::named("host-b"))?;
        assert!(server.join("server-cert.pem").is_file());
        assert!(!server.join("client-cert.pem").exists());
        Ok(())
    }

    /// The pairs load as QEMU's: `qemu-nbd` starts on a directory made here (it refuses
    /// certificates whose key usage lacks what GnuTLS needs before it listens).
    #[test]
    fn qemu_takes_the_credentials() -> Result<()> {
        if !crate::require("qemu-nbd", crate::command_available("qemu-nbd")) {
            return Ok(());
        }
        let pki = Pki::new("test CA")?;
        let dir = pki.credentials("q", &Subject::named("localhost"))?;
        let image = dir.join("e.img");
        std::fs::write(&image, vec![0u8; 4096])?;
        let addr = crate::nbd::NbdAddr::free_tcp()?;
        let opts = crate::nbd::QemuNbdOpts {
            tls_creds: Some(dir.clone()),
            ..crate::nbd::QemuNbdOpts::default()
        };
        crate::nbd::NbdServer::qemu_nbd_with(&image, "e", &addr, opts)?;
        Ok(())
    }
}
