//! `ferry serve`: gather volume settings (flags over the TOML file), open the volumes,
//! bind their sockets, the control socket, the TCP control listener and the NBD listeners,
//! serve, and shut down cleanly on a signal.

use std::net::{TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_engine::journal::{DirLock, Journal, JournalOptions};
use ferry_engine::tls::{TlsAuthz, TlsCredentials};
use nix::sys::signal::{SigSet, Signal};

use crate::control::listener::TcpControl;
use crate::daemon::Daemon;
use crate::incoming::IncomingOptions;
use crate::nbd_serve::{self, NbdArgs, NbdPlan, NbdToml};
use crate::served_volume::{precheck_socket, OpenedVolume, ServedVolume};
use crate::systemd_notify::{notify, Notifier};
use crate::volume_claims::Claims;
use crate::volume_spec::{self, VolumeSpec};

/// Options of `ferry serve`.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// A volume: name=NAME,path=IMG,socket=SOCK[,size=8G][,read-only][,queues=N]
    /// (path may be an NBD export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH,
    /// nbds://… or nbds+unix://… over TLS; [,tls-creds=DIR] gives it its own credentials)
    /// [,queues-per-thread=N][,cache=none|writeback][,serial=STR][,offset=B][,length=B][,poll-us=N][,batch=N]
    /// [,logical-block-size=512|4K|...][,nbd=rw|ro] (exported over NBD, see --nbd-listen)
    #[arg(long = "volume", value_name = "SPEC")]
    pub volumes: Vec<String>,
    /// Open a control socket (line-delimited JSON, see docs/control.md).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Journal every guest write of every volume onto one medium set:
    /// dir=DIR[,capacity=BYTES][,media-max=N][,mode=sync|async][,lag-max=BYTES][,on-full=stop|pause][,label=L]
    /// [,spares=N][,cache=auto|none|writeback][,committer=auto|writer|queue][,log-memory=BYTES][,mapped=auto|on|off]
    #[arg(long, value_name = "SPEC")]
    pub journal: Option<String>,
    /// Read settings from a TOML file; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve the control protocol on TCP as well (other ferry daemons, `ferry ... --control
    /// ferry://HOST:PORT`), with mutual TLS only: needs --tls-creds; clients are checked
    /// against --tls-authz. No volume is needed up front with it.
    #[arg(long, value_name = "HOST:PORT")]
    pub control_listen: Option<String>,
    /// TLS credentials in QEMU's x509 layout: ca-cert.pem, server-cert.pem and
    /// server-key.pem for every listener, client-cert.pem and client-key.pem for outgoing
    /// connections (the default for nbds:// volumes and migration targets that have no
    /// tls-creds of their own).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Allow only TLS clients whose certificate carries one of these names (a common name, a
    /// DNS name, or a whole distinguished name such as CN=a,O=b given alone); repeatable,
    /// comma-separated. Default: every certificate the CA signed.
    #[arg(long = "tls-authz", value_name = "NAMES")]
    pub tls_authz: Vec<String>,
    /// Serve Prometheus metrics (OpenMetrics text) on http://HOST:PORT/metrics: per volume
    /// the requests, bytes and errors, the journal's records and lag, migration progress.
    /// Plaintext: bind it to loopback or a management network.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
    #[command(flatten)]
    pub nbd: NbdArgs,
    /// An incoming volume (a move from another host) not renewed by its source for this
    /// many seconds is abandoned, its image deleted.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub incoming_lease: u64,
    /// Confine every thread with a seccomp filter of the system calls its kind needs
    /// (docs/security.md); `off` for debugging only.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub seccomp: Switch,
    /// Limit the process with Landlock to the paths it was configured with (images,
    /// journal, sockets, TLS credentials) once started; `off` for debugging only.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = Switch::On)]
    pub landlock: Switch,
    /// A directory the daemon may reach besides those it was configured with (for images
    /// added or created later by control commands); repeatable.
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_paths: Vec<PathBuf>,
    /// Run as this user (and group; default: the user's) once every socket is bound and
    /// every image opened: root and its capabilities are dropped for good.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Permissions of the socket files ferry creates (volumes, control), in octal.
    #[arg(long, value_name = "MODE", default_value = "0600")]
    pub socket_mode: String,
    /// Group of the socket files ferry creates (e.g. QEMU's, with --socket-mode 0660).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Members of this group may use the control socket too (besides root and the
    /// daemon's user); other users are refused whatever the socket's mode.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// How long a device started before its volume is handed over waits for the hand-off
    /// before it is refused, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub incoming_start_wait: u64,
}

/// An on/off option.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Switch {
    #[default]
    On,
    Off,
}

/// The TLS options, read and checked before anything is created.
struct TlsPlan {
    credentials: Option<Arc<TlsCredentials>>,
    authz: TlsAuthz,
    /// The TCP control listener's address, checked to resolve.
    control_listen: Option<String>,
}

fn tls_plan(args: &ServeArgs) -> anyhow::Result<TlsPlan> {
    let authz =
        TlsAuthz::from_options(&args.tls_authz).map_err(|e| anyhow::anyhow!("--tls-authz: {e}"))?;
    let credentials = match &args.tls_creds {
        Some(dir) => Some(Arc::new(TlsCredentials::load(dir)?)),
        None => None,
    };
    if !authz.allows_all() && credentials.is_none() {
        bail!("--tls-authz needs --tls-creds DIR");
    }
    if let Some(address) = &args.control_listen {
        let Some(credentials) = &credentials else {
            bail!(
                "--control-listen {address} needs --tls-creds DIR: the control protocol over \
                 TCP is served with mutual TLS only"
            );
        };
        credentials.server_config()?;
        let resolves = address
            .to_socket_addrs()
            .with_context(|| format!("--control-listen {address}: expected HOST:PORT"))?;
        if resolves.count() == 0 {
            bail!("--control-listen {address}: the host has no address");
        }
    }
    Ok(TlsPlan {
        credentials,
        authz,
        control_listen: args.control_listen.clone(),
    })
}

/// Binds the TCP control listener and serves it on its own thread.
fn start_tcp_control(address: &str, daemon: &Arc<Daemon>, authz: TlsAuthz) -> anyhow::Result<()> {
    let credentials = daemon
        .tls
        .as_ref()
        .context("--control-listen needs --tls-creds DIR")?;
    let tls = Arc::new(TcpControl {
        config: credentials.server_config()?,
        authz,
    });
    let listener = TcpListener::bind(address)
        .with_context(|| format!("cannot listen on {address} (--control-listen)"))?;
    let bound = listener.local_addr().context("--control-listen")?;
    println!("ferry: control protocol on ferry://{bound} (mutual TLS)");
    let daemon = daemon.clone();
    std::thread::Builder::new()
        .name("ferry-control-tcp".into())
        .spawn(move || crate::control::serve_tcp(listener, daemon, tls))
        .context("cannot start the control listener thread")?;
    Ok(())
}

/// Sets up the confinement before any thread starts: the user to become later (and the
/// filters' permission to follow that drop), the socket files' access, the control
/// socket's group, the seccomp filters and the Landlock paths.
fn confine(
    args: &ServeArgs,
    plan: &ServePlan,
) -> anyhow::Result<Option<crate::identity::Identity>> {
    let identity = args
        .user
        .as_deref()
        .map(crate::identity::Identity::parse)
        .transpose()?;
    crate::identity::set_socket_access(
        &args.socket_mode,
        args.socket_group.as_deref(),
        identity.as_ref().map(|i| i.uid),
    )?;
    crate::identity::set_control_group(args.control_group.as_deref())?;
    if let Some(identity) = &identity {
        // Threads confined before the drop must be able to follow it.
        ferry_engine::confine::plan_identity_drop(identity.uid.as_raw(), identity.gid.as_raw());
    }
    if args.seccomp == Switch::On {
        ferry_engine::confine::enable().context("cannot enable seccomp filters")?;
    } else {
        log::warn!("--seccomp=off: threads run without seccomp filters");
    }
    if args.landlock == Switch::On {
        restrict_paths(args, plan)?;
    } else {
        log::warn!("--landlock=off: the daemon may open any path its user can");
    }
    Ok(identity)
}

/// Limits the process to the paths it was configured with, before any thread starts (every
/// thread inherits the restriction).
fn restrict_paths(args: &ServeArgs, plan: &ServePlan) -> anyhow::Result<()> {
    use ferry_engine::confine::landlock::{restrict_process, Enforcement};
    let mut sockets: Vec<&Path> = plan.volumes.iter().map(|v| v.socket.as_path()).collect();
    sockets.extend(plan.control.as_deref());
    let mut tls_creds: Vec<&Path> = args.tls_creds.iter().map(PathBuf::as_path).collect();
    tls_creds.extend(plan.volumes.iter().filter_map(|v| v.tls_creds.as_deref()));
    let journal_dir = match &plan.journal {
        Some(spec) => Some(
            JournalOptions::parse(spec)
                .map_err(|e| anyhow::anyhow!("--journal {spec}: {e}"))?
                .dir,
        ),
        None => None,
    };
    let configured = crate::landlock_paths::Configured {
        images: plan
            .volumes
            .iter()
            .map(|v| v.engine.path.as_path())
            .collect(),
        sockets,
        journal_dir: journal_dir.as_deref(),
        tls_creds,
        nbd_listen: &plan.nbd.listen,
        allowed: &args.allow_paths,
    };
    let rules = crate::landlock_paths::rules(&configured);
    match restrict_process(&rules)? {
        // Debug, not info: a refused start prints its one error line alone.
        Enforcement::Full => log::debug!("landlock: paths limited to {:?}", rules.read_write),
        Enforcement::Partial => log::warn!(
            "landlock: paths limited to {:?}, partly: this kernel lacks some Landlock rights",
            rules.read_write
        ),
        Enforcement::None => {
            log::warn!("landlock: not supported by this kernel; paths are not limited")
        }
    }
    Ok(())
}

/// The settings after merging the file and the flags.
struct ServePlan {
    volumes: Vec<VolumeSpec>,
    control: Option<PathBuf>,
    journal: Option<String>,
    nbd: NbdPlan,
}

/// The built-in demo: a 1 GiB sparse image served in the current directory.
fn demo_plan() -> anyhow::Result<ServePlan> {
    let spec = volume_spec::parse_volume("name=demo,path=ferry-demo.img,socket=ferry-demo.sock")
        .map_err(anyhow::Error::msg)?;
    let mut spec = spec;
    if !spec.engine.path.exists() {
        spec.engine.size_bytes = Some(1 << 30);
    }
    Ok(ServePlan {
        volumes: vec![spec],
        control: Some(PathBuf::from("ferry-demo.ctl")),
        journal: None,
        nbd: NbdPlan::default(),
    })
}

fn plan(args: &ServeArgs) -> anyhow::Result<ServePlan> {
    let listening = args.control_listen.is_some() || !args.nbd.listen.is_empty();
    if args.volumes.is_empty() && args.config.is_none() && args.journal.is_none() && !listening {
        return demo_plan();
    }
    let mut volumes = Vec::new();
    let mut control = None;
    let mut journal = None;
    let mut nbd_file = NbdToml::default();
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration {}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("{}: invalid TOML", path.display()))?;
        (volumes, control, journal) = from_toml(&table, &mut nbd_file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let mut flag_names = Vec::new();
    for text in &args.volumes {
        let spec =
            volume_spec::parse_volume(text).map_err(|e| anyhow::anyhow!("--volume {text}: {e}"))?;
        let name = &spec.engine.name;
        if flag_names.contains(name) {
            bail!("two --volume options are named {name}: each volume needs its own name=");
        }
        flag_names.push(name.clone());
        // A flag replaces the configuration file's volume of the same name.
        volumes.retain(|v: &VolumeSpec| &v.engine.name != name);
        volumes.push(spec);
    }
    if args.control.is_some() {
        control = args.control.clone();
    }
    if args.journal.is_some() {
        journal = args.journal.clone();
    }
    let nbd = nbd_serve::plan(&nbd_file, &args.nbd, &volumes, args.tls_creds.is_some())?;
    // A daemon with a TCP control listener (or an NBD one) may start empty: other daemons
    // add volumes.
    if volumes.is_empty() && args.control_listen.is_none() && nbd.listen.is_empty() {
        bail!("no volumes to serve (give --volume or [[volume]] in --config)");
    }
    Ok(ServePlan {
        volumes,
        control,
        journal,
        nbd,
    })
}

type TomlSettings = (Vec<VolumeSpec>, Option<PathBuf>, Option<String>);

fn from_toml(table: &toml::Table, nbd: &mut NbdToml) -> Result<TomlSettings, String> {
    let mut volumes = Vec::new();
    let mut control = None;
    let mut journal = None;
    for (key, value) in table {
        match (key.as_str(), value) {
            ("control", toml::Value::String(s)) => control = Some(PathBuf::from(s)),
            ("journal", toml::Value::String(s)) => journal = Some(s.clone()),
            ("volume", toml::Value::Array(list)) => {
                for item in list {
                    let toml::Value::Table(t) = item else {
                        return Err("[[volume]] entries must be tables".into());
                    };
                    let spec = volume_spec::volume_from_toml(t)?;
                    let name = &spec.engine.name;
                    if volumes.iter().any(|v: &VolumeSpec| &v.engine.name == name) {
                        return Err(format!(
                            "two [[volume]] entries are named {name}: each volume needs its own name"
                        ));
                    }
                    volumes.push(spec);
                }
            }
            (key, value) if nbd.take(key, value)? => {}
            (other, _) => return Err(format!("unknown setting {other:?}")),
        }
    }
    Ok((volumes, control, journal))
}

/// Refuses two volumes on one name, socket or image range, and a volume on the control
/// socket, before anything is created.
fn check_distinct(volumes: &[VolumeSpec], control: Option<&Path>) -> anyhow::Result<()> {
    for (i, a) in volumes.iter().enumerate() {
        let claims = Claims::of_spec(a);
        if let Some(conflict) = control.and_then(|c| claims.conflict_with_control(c)) {
            bail!(conflict);
        }
        for b in &volumes[i + 1..] {
            if let Some(conflict) = claims.conflict(&Claims::of_spec(b)) {
                bail!(conflict);
            }
        }
        if let Some(dir) = a.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                bail!(
                    "volume {}: socket directory {} does not exist",
                    a.engine.name,
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let notifier = Notifier::from_env();
    let plan = plan(&args)?;
    let tls = tls_plan(&args)?;
    check_distinct(&plan.volumes, plan.control.as_deref())?;
    // Signals are taken by the main thread only: block them before any thread starts.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("cannot block signals")?;
    let identity = confine(&args, &plan)?;

    // Check every socket before creating any image, then bind after opening.
    for spec in &plan.volumes {
        precheck_socket(&spec.socket)?;
    }
    if let Some(control) = &plan.control {
        precheck_socket(control)?;
    }
    let journal_options = match &plan.journal {
        Some(spec) => Some(
            JournalOptions::parse(spec).map_err(|e| anyhow::anyhow!("--journal {spec}: {e}"))?,
        ),
        None => None,
    };
    // An existing journal directory is locked before any image is created, so that a
    // directory another daemon appends to refuses the start with nothing left behind; a
    // missing one is created and locked when the journal opens.
    let journal_lock = match &journal_options {
        Some(options) if options.dir.is_dir() => Some(DirLock::acquire(&options.dir)?),
        _ => None,
    };
    let nbd = nbd_serve::server(&plan.nbd, tls.credentials.as_ref(), &tls.authz)?;
    let opening = format!("STATUS=opening {} volume(s)", plan.volumes.len());
    notify(notifier.as_ref(), &[&opening]);
    let mut opened = Vec::new();
    for spec in &plan.volumes {
        opened.push(OpenedVolume::open(spec, tls.credentials.as_ref())?);
    }
    let journal = match (journal_options, journal_lock) {
        (Some(options), Some(lock)) => Some(Journal::open_locked(options, lock)),
        (Some(options), None) => Some(Journal::open(options)),
        (None, _) => None,
    };
    let journal = journal.transpose().context("cannot open the journal")?;
    let incoming = IncomingOptions {
        lease: Duration::from_secs(args.incoming_lease.max(1)),
        start_wait: Duration::from_secs(args.incoming_start_wait),
    };
    let daemon = Arc::new(
        Daemon::new(journal, plan.control.clone(), tls.credentials)
            .with_nbd(nbd)
            .with_incoming_options(incoming),
    );
    crate::incoming::start_lease_keeper(&daemon).context("cannot start the lease thread")?;
    // Before any volume serves a guest: a migration a restart interrupted tracks every
    // write from the first.
    let volumes: Vec<_> = opened.iter().map(|o| o.volume().clone()).collect();
    crate::migration_recovery::recover(&daemon, &volumes);
    let mut served = Vec::new();
    for opened in opened {
        // Exported over NBD here (after the journal's observer: the first NBD write is
        // journaled like a guest's), before the NBD listeners open.
        served.push(daemon.add_opened(opened)?);
    }
    if let Some(server) = &daemon.nbd {
        nbd_serve::listen(server, &plan.nbd)?;
    }
    for served in &served {
        print_attach_hint(served, daemon.nbd.as_deref());
    }
    if let Some(path) = &plan.control {
        let listener = ferry_vhost::bind_socket(path)?;
        crate::identity::apply_socket_access(path)?;
        let daemon = daemon.clone();
        std::thread::Builder::new()
            .name("ferry-control".into())
            .spawn(move || crate::control::serve(listener, daemon))
            .context("cannot start the control thread")?;
    }
    if let Some(address) = &tls.control_listen {
        start_tcp_control(address, &daemon, tls.authz)?;
    }
    if let Some(address) = &args.metrics_listen {
        let bound = crate::metrics::http::start(address, crate::metrics::registry(&daemon))?;
        println!("ferry: metrics on http://{bound}/metrics");
    }
    if let Some(identity) = &identity {
        identity.assume().with_context(|| {
            format!(
                "cannot run as --user {}",
                args.user.as_deref().unwrap_or("")
            )
        })?;
        log::info!("running as uid {} gid {}", identity.uid, identity.gid);
    }
    // Every socket is bound: QEMU, NBD clients and control clients can connect.
    let serving = format!("STATUS=serving {} volume(s)", daemon.volumes().len());
    notify(notifier.as_ref(), &["READY=1", &serving]);
    ferry_engine::confine::enter(&crate::seccomp::MAIN_SYSCALLS);
    let signal = signals.wait().context("waiting for signals failed")?;
    log::info!(signal = signal.as_str(); "{signal}: finishing requests in flight and shutting down");
    let stopping = format!("STATUS={signal}: finishing requests in flight");
    notify(notifier.as_ref(), &["STOPPING=1", &stopping]);
    shut_down(&daemon, plan.control.as_deref());
    notify(notifier.as_ref(), &["STATUS=stopped"]);
    Ok(())
}

/// Stops the NBD server, holds every volume's I/O, waits for requests in flight, syncs,
/// removes the sockets.
fn shut_down(daemon: &Daemon, control: Option<&Path>) {
    if let Some(server) = &daemon.nbd {
        // No new NBD connection or request from here; those in flight drain below.
        server.shutdown();
    }
    let mut guards = Vec::new();
    for served in daemon.volumes() {
        match served.volume.pause(std::time::Duration::from_secs(30)) {
            Some(guard) => guards.push(guard),
            None => log::error!(
                "volume {}: requests still in flight after 30 s",
                served.volume.name()
            ),
        }
        if let Err(e) = served.volume.backing().sync() {
            log::error!("volume {}: final flush failed: {e}", served.volume.name());
        }
        let _ = std::fs::remove_file(&served.socket);
    }
    // Guest I/O is held: each migration writes its job file for the last time, so that
    // `ferry migrate resume` after the restart copies only what is left.
    let kept = daemon.migrations.suspend_all();
    if kept > 0 {
        log::info!("{kept} migration job(s) left for ferry migrate resume after the restart");
    }
    if let Some(path) = control {
        let _ = std::fs::remove_file(path);
    }
    if let Some(journal) = &daemon.journal {
        // Every acknowledged write is already on the medium in sync mode; this writes what
        // async mode still holds and seals the medium.
        journal.close();
    }
    // The guards stay held: the process exits with guest I/O stopped.
    std::mem::forget(guards);
}

fn print_attach_hint(served: &ServedVolume, nbd: Option<&ferry_engine::nbd::NbdServer>) {
    let volume = &served.volume;
    let socket = std::fs::canonicalize(&served.socket).unwrap_or_else(|_| served.socket.clone());
    let name = volume.name();
    println!(
        "ferry: serving volume {name} ({} bytes, {}) on {}",
        volume.size_bytes(),
        volume.backing().path.display(),
        socket.display()
    );
    println!("Attach a QEMU VM with:");
    println!(
        "  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=ferry-{name},path={},reconnect-ms=1000 \\\n  \
         -device vhost-user-blk-pci,chardev=ferry-{name},num-queues={}",
        socket.display(),
        served.queues
    );
    println!("(the memory-backend size must equal the VM's -m size)");
    if let Some(server) = nbd.filter(|_| served.nbd.is_some()) {
        for uri in nbd_serve::export_uris(server, name) {
            println!("  NBD export: {uri}");
        }
    }
}
