//! The metrics endpoint: a minimal HTTP/1.1 server answering `GET /metrics` (and `/`) with
//! the registry's text, one request per connection: OpenMetrics when the scraper accepts
//! it (Prometheus does), the older Prometheus text format otherwise. Bounded like every listener of the
//! daemon: a few connections at once, a request head of at most 8 KiB that must arrive
//! within 10 s, a reply written within 10 s. Plaintext: bind it to loopback or a management
//! network (the metrics say what volumes exist and how busy they are, nothing more).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;

/// Scrapes served at once; beyond it a connection is closed at once.
const CONNECTIONS_MAX: usize = 8;
/// The longest request head read.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Bounds on reading the request and writing the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds `address` and serves the registry on its own thread; returns the bound address.
pub fn start(address: &str, registry: Registry) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(address)
        .with_context(|| format!("cannot listen on {address} (--metrics-listen)"))?;
    let bound = listener.local_addr().context("--metrics-listen")?;
    let registry = Arc::new(registry);
    std::thread::Builder::new()
        .name("ferry-metrics".into())
        .spawn(move || serve(listener, registry))
        .context("cannot start the metrics thread")?;
    Ok(bound)
}

fn serve(listener: TcpListener, registry: Arc<Registry>) {
    ferry_engine::confine::enter(&crate::seccomp::METRICS_SYSCALLS);
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let taken = active.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < CONNECTIONS_MAX).then_some(n + 1)
        });
        if taken.is_err() {
            continue;
        }
        let (registry, slot) = (registry.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("ferry-metrics".into())
            .spawn(move || {
                if let Err(e) = answer(stream, &registry) {
                    log::debug!("metrics: {e}");
                }
                slot.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::error!("metrics: cannot start a connection thread: {e}");
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads one request head and writes the reply.
fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    let (status, content_type, body) = match (method, path) {
        (Some("GET"), Some("/metrics" | "/")) => match super::render(registry) {
            Ok(text) if accepts_openmetrics(&head) => ("200 OK", OPENMETRICS, text),
            Ok(text) => (
                "200 OK",
                PROMETHEUS_TEXT,
                super::openmetrics_to_prometheus_text(&text),
            ),
            Err(_) => (
                "500 Internal Server Error",
                "text/plain",
                "encoding failed\n".into(),
            ),
        },
        (Some("GET"), _) => ("404 Not Found", "text/plain", "see /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes())?;
    stream.flush()
}

/// True when the request's `Accept` header names OpenMetrics (Prometheus's does).
fn accepts_openmetrics(head: &str) -> bool {
    head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text")
        })
    })
}

/// The request head (up to the blank line), bounded.
fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > REQUEST_HEAD_BYTES_MAX {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
