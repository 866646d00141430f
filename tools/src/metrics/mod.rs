//! Prometheus metrics of the running daemon (`--metrics-listen HOST:PORT`): what the
//! counters the volumes, the journal and the migration jobs keep say at the moment of each
//! scrape, encoded by the `prometheus-client` crate in the OpenMetrics text format. The
//! values are read at scrape time from the same counters `query-volumes`,
//! `journal-status` and `query-migrations` report, so serving metrics adds no work to the
//! I/O path. [`http`] serves them.

pub mod http;

use std::fmt;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::daemon::Daemon;
use ferry_engine::replication::primary::PrimaryStatus;

/// The registry with the daemon's collector; the collector holds the daemon weakly, so a
/// scrape during shutdown finds nothing rather than keeping it alive.
pub fn registry(daemon: &Arc<Daemon>) -> Registry {
    let mut registry = Registry::with_prefix("ferry");
    registry.register_collector(Box::new(DaemonCollector(Arc::downgrade(daemon))));
    registry
}

struct DaemonCollector(Weak<Daemon>);

impl fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DaemonCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: a descriptor and one sample per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: Vec<(Labels, M)>,
) -> fmt::Result {
    let Some(metric_type) = samples.first().map(|(_, m)| m.metric_type()) else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(labels: Labels, value: u64) -> (Labels, ConstCounter<u64>) {
    (labels, ConstCounter::new(value))
}

fn gauge(labels: Labels, value: i64) -> (Labels, ConstGauge<i64>) {
    (labels, ConstGauge::new(value))
}

fn as_gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for DaemonCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(daemon) = self.0.upgrade() else {
            return Ok(());
        };
        encode_volumes(&daemon, &mut encoder)?;
        encode_journal(&daemon, &mut encoder)?;
        encode_migrations(&daemon, &mut encoder)?;
        let groups: Vec<(String, PrimaryStatus)> = match daemon.primary_groups.lock() {
            Ok(groups) => groups
                .iter()
                .map(|g| (g.name.clone(), g.status()))
                .collect(),
            Err(_) => Vec::new(),
        };
        encode_replication(&groups, &mut encoder)
    }
}

/// Per volume: requests and bytes by operation, failed requests by kind, requests in
/// flight, the frontend, the size.
fn encode_volumes(daemon: &Daemon, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let (mut ops, mut bytes, mut errors, mut inflight, mut connected, mut size) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for served in daemon.volumes() {
        let name = served.volume.name().to_string();
        let s = served.volume.stats.snapshot();
        let by_op = |op: &'static str| vec![("volume", name.clone()), ("op", op.to_string())];
        for (op, count, len) in [
            ("read", s.read_ops, Some(s.read_bytes)),
            ("write", s.write_ops, Some(s.write_bytes)),
            ("flush", s.flush_ops, None),
            ("discard", s.discard_ops, Some(s.discard_bytes)),
            (
                "write_zeroes",
                s.write_zeroes_ops,
                Some(s.write_zeroes_bytes),
            ),
        ] {
            ops.push(counter(by_op(op), count));
            if let Some(len) = len {
                bytes.push(counter(by_op(op), len));
            }
        }
        for (kind, count) in [
            ("read", s.read_errors),
            ("write", s.write_errors),
            ("flush", s.flush_errors),
            ("discard", s.discard_errors),
            ("write_zeroes", s.write_zeroes_errors),
            ("refused", s.refused),
        ] {
            let labels = vec![("volume", name.clone()), ("kind", kind.to_string())];
            errors.push(counter(labels, count));
        }
        let volume = vec![("volume", name.clone())];
        inflight.push(gauge(volume.clone(), as_gauge(served.volume.inflight())));
        let attached = served
            .connection
            .connected
            .load(std::sync::atomic::Ordering::Relaxed);
        connected.push(gauge(volume.clone(), i64::from(attached)));
        size.push(gauge(volume, as_gauge(served.volume.size_bytes())));
    }
    family(
        encoder,
        "volume_requests",
        "Requests completed, by operation",
        None,
        ops,
    )?;
    family(
        encoder,
        "volume_request",
        "Bytes moved by completed requests, by operation",
        Some(&Unit::Bytes),
        bytes,
    )?;
    family(
        encoder,
        "volume_errors",
        "Requests that failed, by operation (refused: the device refused them before the engine)",
        None,
        errors,
    )?;
    family(
        encoder,
        "volume_requests_in_flight",
        "Requests submitted and not yet completed, all queues",
        None,
        inflight,
    )?;
    family(
        encoder,
        "volume_frontend_connected",
        "1 while a vhost-user frontend (QEMU) is attached",
        None,
        connected,
    )?;
    family(
        encoder,
        "volume_size",
        "The size the guest sees",
        Some(&Unit::Bytes),
        size,
    )
}

/// The journal: records and group commits made durable, bytes not yet durable, the
/// position on the current medium, and whether it runs.
fn encode_journal(daemon: &Daemon, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let Some(journal) = &daemon.journal else {
        return Ok(());
    };
    let status = journal.status();
    let state = serde_json::to_value(status.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let none = Vec::new;
    family(
        encoder,
        "journal_records",
        "Records made durable since the journal opened",
        None,
        vec![counter(none(), status.records)],
    )?;
    family(
        encoder,
        "journal_group_commits",
        "Group commits (append and flush) made",
        None,
        vec![counter(none(), status.group_commits)],
    )?;
    family(
        encoder,
        "journal_lag",
        "Bytes observed but not yet durable",
        Some(&Unit::Bytes),
        vec![gauge(none(), as_gauge(status.lag_bytes))],
    )?;
    family(
        encoder,
        "journal_position",
        "The append position on the current medium",
        Some(&Unit::Bytes),
        vec![gauge(none(), as_gauge(status.position_bytes))],
    )?;
    family(
        encoder,
        "journal_gaps",
        "Gaps recorded (writes that were not journaled)",
        None,
        vec![gauge(
            none(),
            status.gaps.len().try_into().unwrap_or(i64::MAX),
        )],
    )?;
    family(
        encoder,
        "journal_state",
        "1 for the journal's state",
        None,
        vec![gauge(vec![("state", state)], 1)],
    )
}

/// Per migration job: bytes to copy, copied, still dirty, mirrored, the copy rate, the
/// state.
fn encode_migrations(daemon: &Daemon, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let (mut total, mut copied, mut dirty, mut mirrored, mut rate, mut state) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for status in daemon.migrations.statuses() {
        let job = || vec![("job", status.id.to_string())];
        total.push(gauge(job(), as_gauge(status.total_bytes)));
        copied.push(counter(job(), status.copied_bytes));
        dirty.push(gauge(job(), as_gauge(status.dirty_bytes)));
        mirrored.push(counter(job(), status.mirrored_bytes));
        rate.push(gauge(job(), as_gauge(status.rate_bytes_per_s)));
        let name = serde_json::to_value(status.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut labels = job();
        labels.push(("state", name));
        state.push(gauge(labels, 1));
    }
    family(
        encoder,
        "migration_to_copy",
        "Bytes to copy so far (allocated at start plus re-dirtied)",
        Some(&Unit::Bytes),
        total,
    )?;
    family(
        encoder,
        "migration_copied",
        "Bytes the copier wrote to the target",
        Some(&Unit::Bytes),
        copied,
    )?;
    family(
        encoder,
        "migration_dirty",
        "Bytes still to copy",
        Some(&Unit::Bytes),
        dirty,
    )?;
    family(
        encoder,
        "migration_mirrored",
        "Guest bytes the active mirror wrote to the target",
        Some(&Unit::Bytes),
        mirrored,
    )?;
    family(
        encoder,
        "migration_copy_rate_bytes_per_second",
        "The copier's recent rate",
        None,
        rate,
    )?;
    family(
        encoder,
        "migration_state",
        "1 for the job's state",
        None,
        state,
    )
}

/// Per replication group served here as primary: the lag behind the DR site's durable
/// acknowledgment (records, bytes, seconds), the bytes marked in its dirty bitmaps, what
/// its resyncs sent, the link's throughput and the state.
fn encode_replication(
    groups: &[(String, PrimaryStatus)],
    encoder: &mut DescriptorEncoder,
) -> fmt::Result {
    let group = |name: &str| vec![("group", name.to_string())];
    let each = |value: fn(&PrimaryStatus) -> u64| -> Vec<(Labels, ConstGauge<i64>)> {
        groups
            .iter()
            .map(|(name, s)| gauge(group(name), as_gauge(value(s))))
            .collect()
    };
    family(
        encoder,
        "replication_lag_records",
        "Records completed on the primary and not yet durable at the DR site",
        None,
        each(|s| s.lag_records),
    )?;
    family(
        encoder,
        "replication_lag",
        "Bytes of records not yet durable at the DR site",
        Some(&Unit::Bytes),
        each(|s| s.lag_bytes),
    )?;
    family(
        encoder,
        "replication_lag",
        "Age of the oldest record not yet durable at the DR site",
        Some(&Unit::Seconds),
        groups
            .iter()
            .map(|(name, s)| (group(name), ConstGauge::new(s.lag_seconds)))
            .collect(),
    )?;
    family(
        encoder,
        "replication_acknowledged_sequence",
        "The last record the DR site holds durably",
        None,
        each(|s| s.acknowledged_seq),
    )?;
    family(
        encoder,
        "replication_dirty",
        "Bytes marked in the dirty bitmaps (changes not shipped, to resync)",
        Some(&Unit::Bytes),
        each(|s| s.dirty_bytes),
    )?;
    family(
        encoder,
        "replication_resync",
        "Bytes the bitmap resyncs read and sent",
        Some(&Unit::Bytes),
        groups
            .iter()
            .map(|(name, s)| counter(group(name), s.resync_bytes))
            .collect(),
    )?;
    family(
        encoder,
        "replication_link_bytes_per_second",
        "Bytes of records the DR site acknowledged per second, recently",
        None,
        groups
            .iter()
            .map(|(name, s)| (group(name), ConstGauge::new(s.link_bytes_per_s)))
            .collect(),
    )?;
    family(
        encoder,
        "replication_state",
        "1 for the group's state",
        None,
        groups
            .iter()
            .map(|(name, s)| {
                let mut labels = group(name);
                labels.push(("state", s.state.to_string()));
                gauge(labels, 1)
            })
            .collect(),
    )
}

/// The registry's text in the OpenMetrics format (what Prometheus asks for first).
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// OpenMetrics text as Prometheus's older text format (version 0.0.4), for scrapers that
/// do not accept OpenMetrics (`promtool check metrics`, `curl`): there a counter family is
/// named with its `_total` suffix, `# UNIT` and `# EOF` do not exist, and a sample without
/// labels has no braces. The samples and their values are the same.
pub fn openmetrics_to_prometheus_text(text: &str) -> String {
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(&line.replacen("{} ", " ", 1)),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_total_families_in_the_older_format() {
        let open = "# HELP ferry_x Things done\n# TYPE ferry_x counter\n# UNIT ferry_x bytes\n\
                    ferry_x_total{volume=\"a\"} 3\n# HELP ferry_g A level\n# TYPE ferry_g gauge\n\
                    ferry_g{} 7\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(open),
            "# HELP ferry_x_total Things done\n# TYPE ferry_x_total counter\n\
             ferry_x_total{volume=\"a\"} 3\n# HELP ferry_g A level\n# TYPE ferry_g gauge\n\
             ferry_g 7\n"
        );
    }

    #[derive(Debug)]
    struct Groups(Vec<(String, PrimaryStatus)>);

    impl Collector for Groups {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            encode_replication(&self.0, &mut encoder)
        }
    }

    #[test]
    fn replication_groups_report_their_lag_bitmap_and_state() {
        let status = PrimaryStatus {
            state: "degraded",
            lag_records: 12,
            lag_bytes: 49152,
            lag_seconds: 1.5,
            dirty_bytes: 8192,
            resync_bytes: 4096,
            ..PrimaryStatus::default()
        };
        let mut registry = Registry::with_prefix("ferry");
        registry.register_collector(Box::new(Groups(vec![("web".into(), status)])));
        let text = render(&registry).expect("render");
        for sample in [
            "ferry_replication_lag_records{group=\"web\"} 12",
            "ferry_replication_lag_bytes{group=\"web\"} 49152",
            "ferry_replication_lag_seconds{group=\"web\"} 1.5",
            "ferry_replication_dirty_bytes{group=\"web\"} 8192",
            "ferry_replication_resync_bytes_total{group=\"web\"} 4096",
            "ferry_replication_state{group=\"web\",state=\"degraded\"} 1",
        ] {
            assert!(text.contains(sample), "{sample} missing from:\n{text}");
        }
    }
}
