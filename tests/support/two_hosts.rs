//! Two hosts for tests of moves between ferry daemons: network namespaces joined by a veth
//! pair, a test CA, daemon A (10.77.0.1) serving volume `vm1` with a unix control socket
//! and its own credentials (certificate `ferry-a`), and daemon B (10.77.0.2) serving no
//! volume, with the TCP control listener and an NBD listener, allowing `ferry-a` only.
//! Optionally A also exports `vm1` read-write on its own NBD listener.

use anyhow::{Context as _, Result};
use ferry_test_support::netns::{Host, Network};
use ferry_test_support::pki::{Pki, Subject};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::daemon::{Daemon, START_TIMEOUT};
use super::ferry_cli::CliOutput;
use super::wait::{tcp_listening_in, unix_listening_in};

/// The TCP control port and the NBD port of the destination (in its own namespace).
pub const CONTROL_PORT: u16 = 7000;
pub const NBD_PORT: u16 = 10809;
pub const MIB: usize = 1 << 20;
/// The source volume's size.
pub const VOLUME_BYTES: u64 = 32 << 20;

pub fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// `ferry ARGS` run in `host` (or here, for `None`), to its end.
pub fn ferry_in(host: Option<&Host>, args: &[&str]) -> Result<CliOutput> {
    let mut command = match host {
        Some(host) => host.command(super::ferry_bin()),
        None => Command::new(super::ferry_bin()),
    };
    let out = command
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run ferry {args:?}"))?;
    Ok(CliOutput {
        args: args.iter().map(|s| s.to_string()).collect(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// What the daemons are started with besides their listeners.
pub struct HostOptions {
    /// A also serves `vm2` (16 MiB, socket `a2.sock`).
    pub second_volume: bool,
    /// A exports `vm1` read-write on an NBD listener of its own (port [`NBD_PORT`]).
    pub source_nbd: bool,
    pub lease_s: u64,
    pub start_wait_s: u64,
    /// B's `--tls-authz`.
    pub authz: &'static str,
    /// Directories B may reach at run time besides its own (`--allow-path`), such as where
    /// a benchmark keeps B's replicas on tmpfs.
    pub allow_paths_b: Vec<PathBuf>,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            lease_s: 600,
            start_wait_s: 600,
            authz: "ferry-a",
            second_volume: false,
            source_nbd: false,
            allow_paths_b: Vec::new(),
        }
    }
}

/// Host A (10.77.0.1) serves `vm1` with a unix control socket and its own credentials
/// (certificate `ferry-a`); host B (10.77.0.2) serves no volume, with the TCP control
/// listener and an NBD listener, allowing `ferry-a` only.
pub struct TwoHosts {
    // Fields drop in order: the daemons before their network and their files.
    pub daemon_a: Daemon,
    pub daemon_b: Daemon,
    pub network: Network,
    pub pki: Pki,
    pub creds_a: PathBuf,
    pub dir: tempfile::TempDir,
    /// How B was started, to start it again.
    args_b: Vec<String>,
}

/// Starts daemon B in `host` with `args`, ready once its control and NBD ports listen.
fn start_b(host: &Host, args: &[String]) -> Result<Daemon> {
    let mut command = host.command(super::ferry_bin());
    command.args(args).env("RUST_LOG", "info");
    let mut daemon_b = Daemon::spawn("ferry-b", command)?;
    let pid = daemon_b.pid();
    daemon_b.wait_ready(&format!("TCP port {CONTROL_PORT}"), START_TIMEOUT, || {
        tcp_listening_in(pid, CONTROL_PORT) && tcp_listening_in(pid, NBD_PORT)
    })?;
    Ok(daemon_b)
}

impl TwoHosts {
    pub fn start(options: HostOptions) -> Result<Option<Self>> {
        let Some(network) =
            super::require_ok("network namespaces (root, iproute2)", Network::new(2))
        else {
            return Ok(None);
        };
        let pki = Pki::new("ferry test CA")?;
        let (a, b) = (network.host(0), network.host(1));
        let (address_a, address_b) = (a.address.to_string(), b.address.to_string());
        let (creds_a, creds_b) = host_credentials(&pki, &network)?;
        let dir = super::scratch_dir()?;
        let control_a = dir.path().join("a.ctl");
        let (source_export, source_listen) = if options.source_nbd {
            (
                ",nbd=rw",
                vec![
                    "--nbd-listen".to_string(),
                    format!("{address_a}:{NBD_PORT}"),
                ],
            )
        } else {
            ("", Vec::new())
        };
        let mut command = a.command(super::ferry_bin());
        command
            .arg("serve")
            .arg("--volume")
            .arg(format!(
                "name=vm1,path={},socket={},size={VOLUME_BYTES}{source_export}",
                dir.path().join("a.img").display(),
                dir.path().join("a.sock").display()
            ))
            .args(source_listen)
            .args(second_volume(&options, dir.path()))
            .arg("--control")
            .arg(&control_a)
            .arg("--tls-creds")
            .arg(&creds_a)
            .env("RUST_LOG", "info");
        let mut daemon_a = Daemon::spawn("ferry-a", command)?;
        let pid = daemon_a.pid();
        daemon_a.wait_ready("its control socket", START_TIMEOUT, || {
            unix_listening_in(pid, &control_a)
                && (!options.source_nbd || tcp_listening_in(pid, NBD_PORT))
        })?;
        let mut args_b: Vec<String> = vec![
            "serve".into(),
            "--control".into(),
            path_str(&dir.path().join("b.ctl"))?.into(),
            "--control-listen".into(),
            format!("{address_b}:{CONTROL_PORT}"),
            "--nbd-listen".into(),
            format!("{address_b}:{NBD_PORT}"),
            "--tls-creds".into(),
            path_str(&creds_b)?.into(),
            "--tls-authz".into(),
            options.authz.into(),
            "--incoming-lease".into(),
            options.lease_s.to_string(),
            "--incoming-start-wait".into(),
            options.start_wait_s.to_string(),
        ];
        for dir in &options.allow_paths_b {
            args_b.extend(["--allow-path".into(), path_str(dir)?.into()]);
        }
        let daemon_b = start_b(b, &args_b)?;
        Ok(Some(Self {
            daemon_a,
            daemon_b,
            network,
            pki,
            creds_a,
            dir,
            args_b,
        }))
    }

    /// Kills B (SIGKILL: a crash) and starts it again with the same arguments.
    pub fn crash_and_restart_b(&mut self) -> Result<()> {
        self.daemon_b.kill();
        self.daemon_b = start_b(self.network.host(1), &self.args_b)?;
        Ok(())
    }

    /// Kills B (SIGKILL: a crash) and leaves it down until [`restart_b`](Self::restart_b).
    pub fn kill_b(&mut self) {
        self.daemon_b.kill();
    }

    /// Starts B again with the arguments it was first started with.
    pub fn restart_b(&mut self) -> Result<()> {
        self.daemon_b = start_b(self.network.host(1), &self.args_b)?;
        Ok(())
    }

    pub fn host_a(&self) -> &Host {
        self.network.host(0)
    }

    pub fn url_b(&self) -> String {
        format!("ferry://{}:{CONTROL_PORT}", self.network.host(1).address)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ferry query` of B's TCP listener from host A with `creds` (A's by default).
    pub fn query_b(
        &self,
        creds: Option<&Path>,
        command: &str,
        arguments: &Value,
    ) -> Result<CliOutput> {
        let url = self.url_b();
        let creds = path_str(creds.unwrap_or(&self.creds_a))?.to_string();
        let arguments = arguments.to_string();
        ferry_in(
            Some(self.host_a()),
            &[
                "query",
                "--control",
                &url,
                "--tls-creds",
                &creds,
                command,
                "--arguments",
                &arguments,
            ],
        )
    }

    /// `command` on B's unix control socket (as the local operator).
    pub fn local_b(&self, command: &str) -> Result<Value> {
        super::ferry::query(&self.path("b.ctl"), command)
    }

    pub fn prepare(&self, name: &str) -> Result<Value> {
        self.query_b(
            None,
            "incoming-prepare",
            &json!({
                "name": name,
                "size": 16 << 20,
                "path": self.path(&format!("{name}.img")),
                "socket": self.path(&format!("{name}.sock")),
            }),
        )?
        .ok()?
        .json()
    }

    /// `qemu-io -c COMMAND` on B's export `name` from host A, over TLS with A's certificate.
    pub fn qemu_io_b(&self, name: &str, command: &str) -> Result<std::process::Output> {
        self.qemu_io(1, name, command)
    }

    /// `qemu-io -c COMMAND` on export `name` of host `index` (0 for A, 1 for B) from host
    /// A, over TLS with A's certificate.
    pub fn qemu_io(&self, index: usize, name: &str, command: &str) -> Result<std::process::Output> {
        let address = self.network.host(index).address;
        self.host_a()
            .command("qemu-io")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                path_str(&self.creds_a)?
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host={address},server.port={NBD_PORT},export={name},tls-creds=tls0"
            ))
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .context("run qemu-io")
    }

    pub fn incoming_state(&self, name: &str) -> Result<Option<String>> {
        let list = self.local_b("query-incoming")?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .and_then(|v| v["state"].as_str().map(str::to_string)))
    }

    /// `ferry migrate start` of `vm1` on A to B (image `b-vm1.img`, socket `b-vm1.sock` in
    /// the test's directory) with `extra` options; the job's id.
    pub fn migrate_to_b(&self, extra: &[&str]) -> Result<u64> {
        self.migrate_to_b_at(&self.path("b-vm1.img"), extra)
    }

    /// [`migrate_to_b`](Self::migrate_to_b) with B's image at `image`.
    pub fn migrate_to_b_at(&self, image: &Path, extra: &[&str]) -> Result<u64> {
        let started = self.start_migration(image, extra)?.ok()?.json()?;
        started["job"]
            .as_u64()
            .context("migrate start names its job")
    }

    /// `ferry migrate start` of `vm1` to B as it ended.
    pub fn start_migration(&self, image: &Path, extra: &[&str]) -> Result<CliOutput> {
        let control_a = self.path("a.ctl");
        let target = format!("{}/vm1", self.url_b());
        let socket = self.path("b-vm1.sock");
        let mut args = vec![
            "migrate",
            "start",
            "--control",
            path_str(&control_a)?,
            "--volume",
            "vm1",
            "--target",
            &target,
            "--path",
            path_str(image)?,
            "--socket",
            path_str(&socket)?,
            "--json",
        ];
        args.extend_from_slice(extra);
        ferry_in(None, &args)
    }

    /// Waits until job `id` is `ready` (failing at once if it ends).
    pub fn wait_ready(&self, id: u64) -> Result<()> {
        super::wait::wait_until(
            &format!("job {id} ready"),
            super::wait::HANG_TIMEOUT,
            || {
                let s = self.job_status(id)?;
                anyhow::ensure!(!is_over(&s), "job {id} ended: {s}");
                Ok(s["state"] == "ready")
            },
        )
    }

    /// Waits until job `id` has handed its volume off (failing at once if it fails).
    pub fn wait_handed_off(&self, id: u64) -> Result<Value> {
        super::wait::wait_until(
            &format!("job {id} handed off"),
            super::wait::HANG_TIMEOUT,
            || {
                let s = self.job_status(id)?;
                anyhow::ensure!(
                    s["state"] != "failed" && s["state"] != "cancelled",
                    "the move failed: {s}"
                );
                Ok(s["state"] == "completed" && s["handed_off"] == json!(true))
            },
        )?;
        self.job_status(id)
    }

    /// Job `id`'s status on A.
    pub fn job_status(&self, id: u64) -> Result<Value> {
        let all = super::ferry::query(&self.path("a.ctl"), "query-migrations")?;
        all.as_array()
            .and_then(|l| l.iter().find(|s| s["id"] == json!(id)).cloned())
            .context("the job is listed")
    }
}

/// `--volume` for A's second volume, when asked for.
fn second_volume(options: &HostOptions, dir: &Path) -> Vec<String> {
    if !options.second_volume {
        return Vec::new();
    }
    vec![
        "--volume".into(),
        format!(
            "name=vm2,path={},socket={},size={}",
            dir.join("a2.img").display(),
            dir.join("a2.sock").display(),
            16 << 20
        ),
    ]
}

/// True once a job has ended.
fn is_over(status: &Value) -> bool {
    matches!(
        status["state"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

/// Credentials for host A (`ferry-a`) and host B (`ferry-b`) of `network`, each certificate
/// naming its host's address: the names the daemons' `--tls-authz` lists allow.
pub fn host_credentials(pki: &Pki, network: &Network) -> Result<(PathBuf, PathBuf)> {
    let mut dirs = Vec::new();
    for (index, (dir, name)) in [("a", "ferry-a"), ("b", "ferry-b")].into_iter().enumerate() {
        let address = network.host(index).address.to_string();
        dirs.push(pki.credentials(
            dir,
            &Subject {
                common_name: name,
                ip_addresses: &[&address],
                ..Subject::default()
            },
        )?);
    }
    let creds_b = dirs.pop().context("no credentials for host B")?;
    let creds_a = dirs.pop().context("no credentials for host A")?;
    Ok((creds_a, creds_b))
}
