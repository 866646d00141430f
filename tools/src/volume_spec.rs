//! Volume settings as the operator writes them: `--volume name=..,path=..,socket=..` or a
//! `[[volume]]` table in the TOML configuration file, validated into one form.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_engine::tls::TlsCredentials;
use ferry_engine::{CacheMode, VolumeConfig};
use ferry_vhost::DeviceSettings;

/// Everything `ferry serve` needs to serve one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub engine: VolumeConfig,
    pub socket: PathBuf,
    pub queues: u16,
    pub queues_per_thread: u16,
    pub serial: Option<String>,
    pub poll_us: u64,
    pub batch: u16,
    /// The logical block size the guest sees (`logical-block-size=`).
    pub logical_block_bytes: u32,
    /// TLS credentials for a volume on an NBD export (`tls-creds=DIR`, QEMU's x509 layout),
    /// loaded when the volume opens.
    pub tls_creds: Option<PathBuf>,
    /// Exported over NBD under the volume's name (`nbd=rw|ro`); `None`: not exported.
    pub nbd: Option<NbdExportMode>,
}

/// How a volume is exported over NBD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdExportMode {
    ReadWrite,
    ReadOnly,
}

/// Default longest adaptive busy-poll window, in microseconds (QEMU's `poll-max-ns`
/// default is 32768 ns); the window only grows when requests keep arriving that soon.
pub const DEFAULT_POLL_US: u64 = 32;

/// Default requests a worker takes from one ring before it submits them and hands back
/// what has completed (`batch=`). With a client that waits for completions at QD 32, taking
/// the whole ring each pass made the guest and the worker take turns (the guest idle while
/// 32 requests were processed, then the worker idle while the guest refilled); 8 at a time
/// lets both work at once. Polling clients and QD <= 8 are unaffected. The measurement is in
/// `benches/perf-notes.md`, *At most `batch=` requests per pass*.
pub const DEFAULT_BATCH: u16 = 8;

/// The largest `batch=`: a ring holds at most this many requests.
pub const BATCH_MAX: u16 = ferry_vhost::backend::QUEUE_SIZE_MAX;
use ferry_vhost::backend::{QUEUES_MAX, QUEUES_PER_THREAD_MAX};

/// Default virtqueues per volume: enough for a guest with several vCPUs (QEMU refuses a
/// `num-queues` above what the backend offers); an idle queue's thread just sleeps.
pub const DEFAULT_QUEUES: u16 = 4;

impl VolumeSpec {
    pub fn device_settings(&self) -> DeviceSettings {
        DeviceSettings {
            queues: self.queues,
            queues_per_thread: self.queues_per_thread,
            serial: self
                .serial
                .clone()
                .unwrap_or_else(|| self.engine.name.clone()),
            poll_us: self.poll_us,
            batch: self.batch,
            logical_block_bytes: self.logical_block_bytes,
        }
    }

    fn empty() -> Self {
        Self {
            engine: VolumeConfig::default(),
            socket: PathBuf::new(),
            queues: DEFAULT_QUEUES,
            queues_per_thread: 1,
            serial: None,
            poll_us: DEFAULT_POLL_US,
            batch: DEFAULT_BATCH,
            logical_block_bytes: ferry_vhost::config::LOGICAL_BLOCK_BYTES_DEFAULT,
            tls_creds: None,
            nbd: None,
        }
    }

    /// The engine's settings, with the NBD export's TLS credentials loaded: the volume's own
    /// `tls-creds=`, or `daemon_tls` (`ferry serve --tls-creds`) for an `nbds://` path without
    /// them. Credentials make even an `nbd://` connection use TLS, so the daemon's are not
    /// given to those: a plaintext export stays reachable from a daemon that has credentials.
    pub fn engine_config(
        &self,
        daemon_tls: Option<&Arc<TlsCredentials>>,
    ) -> anyhow::Result<VolumeConfig> {
        let wants_tls = ferry_engine::volume::nbd_export::parse_uri(&self.engine.path)
            .and_then(Result::ok)
            .is_some_and(|uri| uri.tls);
        let mut config = self.engine.clone();
        config.nbd_tls = match &self.tls_creds {
            Some(dir) => {
                Some(Arc::new(TlsCredentials::load(dir).map_err(|e| {
                    anyhow::anyhow!("volume {}: {e}", self.engine.name)
                })?))
            }
            None if wants_tls => daemon_tls.cloned(),
            None => None,
        };
        Ok(config)
    }

    /// Sets one `key=value` (or a bare flag such as `read-only`).
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        let need = || value.ok_or_else(|| format!("{key}= needs a value"));
        match key {
            "name" => self.engine.name = need()?.to_string(),
            "path" => self.engine.path = PathBuf::from(need()?),
            "socket" => self.socket = PathBuf::from(need()?),
            "tls-creds" => self.tls_creds = Some(PathBuf::from(need()?)),
            "size" => self.engine.size_bytes = Some(parse_size(need()?)?),
            "offset" => self.engine.offset_bytes = parse_size(need()?)?,
            "length" => self.engine.length_bytes = Some(parse_size(need()?)?),
            "read-only" | "readonly" => self.engine.read_only = parse_bool(value)?,
            "cache" => {
                self.engine.cache = match need()? {
                    "none" => CacheMode::None,
                    "writeback" => CacheMode::Writeback,
                    other => return Err(format!("cache={other}: expected none or writeback")),
                }
            }
            "queues" => self.queues = parse_count(key, need()?, QUEUES_MAX)?,
            "queues-per-thread" => {
                self.queues_per_thread = parse_count(key, need()?, QUEUES_PER_THREAD_MAX)?
            }
            "serial" => {
                let serial = need()?;
                if serial.len() > 20 {
                    return Err(format!("serial={serial}: at most 20 bytes"));
                }
                self.serial = Some(serial.to_string());
            }
            "poll-us" => {
                self.poll_us = need()?.parse().map_err(|_| {
                    format!(
                        "poll-us={}: expected microseconds",
                        need().unwrap_or_default()
                    )
                })?
            }
            "batch" => self.batch = parse_count(key, need()?, BATCH_MAX)?,
            "logical-block-size" => {
                let text = need()?;
                let bytes = parse_size(text)
                    .ok()
                    .and_then(|b| u32::try_from(b).ok())
                    .ok_or_else(|| format!("logical-block-size={text}: expected a size"))?;
                ferry_vhost::config::check_logical_block_bytes(bytes)?;
                self.logical_block_bytes = bytes;
                self.engine.request_block_bytes = u64::from(bytes);
            }
            "nbd" => {
                self.nbd = match need()? {
                    "rw" => Some(NbdExportMode::ReadWrite),
                    "ro" => Some(NbdExportMode::ReadOnly),
                    "off" | "no" => None,
                    other => return Err(format!("nbd={other}: expected rw, ro or off")),
                }
            }
            other => return Err(format!("unknown volume setting {other:?}")),
        }
        Ok(())
    }

    /// Checks that the required settings are present.
    pub fn finish(self) -> Result<Self, String> {
        if self.engine.name.is_empty() {
            return Err("a volume needs name=".into());
        }
        let name = &self.engine.name;
        if self.engine.path.as_os_str().is_empty() {
            return Err(format!("volume {name} needs path="));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(format!("volume {name} needs socket="));
        }
        if self.queues_per_thread > self.queues {
            return Err(format!("volume {name}: queues-per-thread exceeds queues"));
        }
        let on_nbd = self
            .engine
            .path
            .to_str()
            .is_some_and(ferry_engine::nbd::ExportUri::has_scheme);
        if self.tls_creds.is_some() && !on_nbd {
            return Err(format!(
                "volume {name}: tls-creds= is for a volume on an NBD export (path=nbds://… or nbd://…)"
            ));
        }
        // Before anything is created: an image made and then refused would be left behind.
        let block = u64::from(self.logical_block_bytes);
        for (key, bytes) in [
            ("size", self.engine.size_bytes),
            ("length", self.engine.length_bytes),
            ("offset", Some(self.engine.offset_bytes)),
        ] {
            if let Some(bytes) = bytes.filter(|b| !b.is_multiple_of(block)) {
                return Err(format!(
                    "volume {name}: {key}={bytes} is not a multiple of logical-block-size={block}"
                ));
            }
        }
        Ok(self)
    }
}

/// Parses `name=vm1,path=vm1.img,socket=vm1.sock,size=8G,read-only`.
pub fn parse_volume(text: &str) -> Result<VolumeSpec, String> {
    let mut spec = VolumeSpec::empty();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (part.trim(), None),
        };
        spec.set(key, value)?;
    }
    spec.finish()
}

/// A volume table of the TOML configuration file: the same keys as `--volume`.
pub fn volume_from_toml(table: &toml::Table) -> Result<VolumeSpec, String> {
    let mut spec = VolumeSpec::empty();
    for (key, value) in table {
        let text = match value {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            other => return Err(format!("volume setting {key}: unsupported value {other}")),
        };
        spec.set(key, text.as_deref())?;
    }
    spec.finish()
}

pub use ferry_engine::units::parse_size;

fn parse_bool(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("on" | "true" | "yes" | "1") => Ok(true),
        Some("off" | "false" | "no" | "0") => Ok(false),
        Some(other) => Err(format!("expected on or off, got {other:?}")),
    }
}

fn parse_count(key: &str, value: &str, max: u16) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(n) if n >= 1 && n <= max => Ok(n),
        _ => Err(format!("{key}={value}: expected a number from 1 to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One io_uring per thread holds 1024 entries per queue, and the kernel allows 32768.
    #[test]
    fn refuses_more_queues_per_thread_than_a_ring_can_hold() {
        let spec = "name=v,path=v.img,socket=v.sock,queues=64";
        assert!(parse_volume(&format!("{spec},queues-per-thread=32")).is_ok());
        let err = parse_volume(&format!("{spec},queues-per-thread=33")).err();
        assert_eq!(
            err.as_deref(),
            Some("queues-per-thread=33: expected a number from 1 to 32")
        );
        assert!(parse_volume(&format!("{spec}0")).is_err(), "queues=640");
    }

    #[test]
    fn parses_a_full_spec() -> Result<(), String> {
        let spec = parse_volume(
            "name=vm1,path=vm1.img,socket=/run/vm1.sock,size=8G,read-only,queues=2,cache=none,serial=abc",
        )?;
        assert_eq!(spec.engine.name, "vm1");
        assert_eq!(spec.engine.size_bytes, Some(8 << 30));
        assert!(spec.engine.read_only);
        assert_eq!(spec.queues, 2);
        assert_eq!(spec.engine.cache, CacheMode::None);
        assert_eq!(spec.serial.as_deref(), Some("abc"));
        assert_eq!(spec.batch, DEFAULT_BATCH);
        assert_eq!(parse_volume("name=a,path=b,socket=c,batch=32")?.batch, 32);
        assert_eq!(spec.logical_block_bytes, 512);
        let spec = parse_volume("name=a,path=b,socket=c,logical-block-size=4K")?;
        assert_eq!(spec.logical_block_bytes, 4096);
        assert_eq!(spec.device_settings().logical_block_bytes, 4096);
        Ok(())
    }

    #[test]
    fn takes_tls_credentials_for_an_nbd_export_only() -> Result<(), String> {
        let spec = parse_volume("name=a,path=nbds://h/e,socket=c,tls-creds=/etc/pki/ferry")?;
        assert_eq!(spec.tls_creds, Some(PathBuf::from("/etc/pki/ferry")));
        assert_eq!(
            parse_volume("name=a,path=a.img,socket=c,tls-creds=/etc/pki/ferry").err(),
            Some(
                "volume a: tls-creds= is for a volume on an NBD export (path=nbds://… or nbd://…)"
                    .into()
            )
        );
        Ok(())
    }

    #[test]
    fn refuses_bad_input() {
        assert!(parse_volume("name=a,path=b").is_err());
        assert!(parse_volume("name=a,path=b,socket=c,size=12Q").is_err());
        assert!(parse_volume("name=a,path=b,socket=c,queues=0").is_err());
        assert!(parse_volume("name=a,path=b,socket=c,bogus=1").is_err());
        assert!(parse_volume("name=a,path=b,socket=c,batch=0").is_err());
        assert!(parse_volume("name=a,path=b,socket=c,batch=1025").is_err());
        assert_eq!(
            parse_volume("name=a,path=b,socket=c,logical-block-size=3000").err(),
            Some("logical-block-size=3000: expected a power of two from 512 to 65536".into())
        );
        assert!(parse_volume("name=a,path=b,socket=c,logical-block-size=128K").is_err());
        assert!(parse_volume("name=a,path=b,socket=c,logical-block-size=x").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(
            parse_volume("name=a,path=b,socket=c,nbd=yes").err(),
            Some("nbd=yes: expected rw, ro or off".into())
        );
    }

    #[test]
    fn parses_the_nbd_export_mode() -> Result<(), String> {
        assert_eq!(parse_volume("name=a,path=b,socket=c")?.nbd, None);
        let rw = parse_volume("name=a,path=b,socket=c,nbd=rw")?;
        assert_eq!(rw.nbd, Some(NbdExportMode::ReadWrite));
        let ro = parse_volume("name=a,path=b,socket=c,nbd=ro")?;
        assert_eq!(ro.nbd, Some(NbdExportMode::ReadOnly));
        let mut table = toml::Table::new();
        for (k, v) in [("name", "a"), ("path", "b"), ("socket", "c"), ("nbd", "ro")] {
            table.insert(k.into(), toml::Value::String(v.into()));
        }
        assert_eq!(volume_from_toml(&table)?.nbd, Some(NbdExportMode::ReadOnly));
        Ok(())
    }
}
