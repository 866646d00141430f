//! Hosts for tests of ferry across machines: network namespaces (as root, with `ip` and `tc`
//! from iproute2), each a host with one interface `ferry0` and the address `10.77.0.N/24`
//! (N from 1), joined by veth pairs: two hosts directly, more through a bridge in a switch
//! namespace. A test runs processes in a host, sets a host's link down and up, and limits
//! the rate a host sends at (`tc qdisc ... tbf`); everything is deleted when the
//! [`Network`] drops.
//!
//! Names carry the test process's id and a counter, so tests run in parallel; namespaces a
//! killed test process left behind are deleted by the next [`Network::new`].

use anyhow::{bail, ensure, Context as _, Result};
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The start of every namespace name this module makes.
const NAME_PREFIX: &str = "ferry-t";
/// Each host's interface.
pub const INTERFACE: &str = "ferry0";
/// The hosts' subnet: host N (from 1) is 10.77.0.N.
const SUBNET: [u8; 3] = [10, 77, 0];
const PREFIX_LEN: u8 = 24;
/// Hosts in one network at most (one /24).
const HOSTS_MAX: usize = 250;

/// One host: a network namespace with one interface on the test network.
#[derive(Debug, Clone)]
pub struct Host {
    pub namespace: String,
    pub address: Ipv4Addr,
}

/// Hosts joined by veth pairs; deleted on drop.
pub struct Network {
    hosts: Vec<Host>,
    /// The namespace holding the bridge, when there are more than two hosts.
    switch: Option<String>,
}

/// Checks that namespaces can be made here: root, and `ip netns` working.
pub fn available() -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective user.
    let uid = std::fs::metadata("/proc/self")
        .context("read /proc/self")?
        .uid();
    ensure!(uid == 0, "network namespaces need root");
    ip(&["netns", "list"]).context("`ip netns` (iproute2)")?;
    Ok(())
}

impl Network {
    /// `count` hosts (at least 2), each link up, loopback up in each.
    pub fn new(count: usize) -> Result<Self> {
        ensure!(
            (2..=HOSTS_MAX).contains(&count),
            "a network has 2 to {HOSTS_MAX} hosts"
        );
        available()?;
        remove_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = format!(
            "{NAME_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // Each namespace joins `network` as it is made, so a failure midway deletes it.
        let mut network = Self {
            hosts: Vec::new(),
            switch: None,
        };
        for index in 0..count {
            let namespace = format!("{base}-h{index}");
            ip(&["netns", "add", &namespace])?;
            let host_number = u8::try_from(index + 1).context("host number")?;
            let [a, b, c] = SUBNET;
            network.hosts.push(Host {
                namespace,
                address: Ipv4Addr::new(a, b, c, host_number),
            });
            ip(&[
                "-n",
                &network.hosts[index].namespace,
                "link",
                "set",
                "lo",
                "up",
            ])?;
        }
        if count == 2 {
            network.join_directly()?;
        } else {
            let switch = format!("{base}-sw");
            ip(&["netns", "add", &switch])?;
            network.switch = Some(switch);
            network.join_through_switch()?;
        }
        for host in &network.hosts {
            let cidr = format!("{}/{PREFIX_LEN}", host.address);
            ip(&[
                "-n",
                &host.namespace,
                "addr",
                "add",
                &cidr,
                "dev",
                INTERFACE,
            ])?;
            host.set_link(true)?;
        }
        Ok(network)
    }

    /// Host `index` (from 0; its address ends in `index + 1`).
    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn join_directly(&self) -> Result<()> {
        let (a, b) = (&self.hosts[0].namespace, &self.hosts[1].namespace);
        ip(&[
            "link", "add", INTERFACE, "netns", a, "type", "veth", "peer", "name", INTERFACE,
            "netns", b,
        ])
    }

    fn join_through_switch(&self) -> Result<()> {
        let switch = self.switch.as_deref().context("no switch namespace")?;
        ip(&["-n", switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", switch, "link", "set", "br0", "up"])?;
        for (index, host) in self.hosts.iter().enumerate() {
            let port = format!("port{index}");
            ip(&[
                "link",
                "add",
                INTERFACE,
                "netns",
                &host.namespace,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                switch,
            ])?;
            ip(&["-n", switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", switch, "link", "set", &port, "up"])?;
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let namespaces = self.hosts.iter().map(|h| &h.namespace).chain(&self.switch);
        for namespace in namespaces {
            if let Err(e) = ip(&["netns", "del", namespace]) {
                eprintln!("netns: cannot delete {namespace}: {e:#}");
            }
        }
    }
}

impl Host {
    /// `program` to be run inside this host (`ip netns exec`, which execs it: the child's
    /// pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(program);
        command
    }

    /// Runs `program ARGS` inside this host to its end; fails unless it succeeds.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let output = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {program} in {}", self.namespace))?;
        if !output.status.success() {
            bail!(
                "{program} {args:?} in {} failed ({}): {}",
                self.namespace,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }

    /// Sets this host's link up or down (down: nothing reaches it or leaves it, as with a
    /// cable pulled; connections stay open on both ends).
    pub fn set_link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.namespace, "link", "set", INTERFACE, state])
    }

    /// Limits what this host sends to `bits_per_s` (a token bucket, `tc ... tbf`, with a
    /// burst of 10 ms at that rate and at most 100 ms of queue).
    pub fn limit_rate(&self, bits_per_s: u64) -> Result<()> {
        let burst_bytes = (bits_per_s / 8 / 100).max(16 * 1024);
        tc(&[
            "-n",
            &self.namespace,
            "qdisc",
            "replace",
            "dev",
            INTERFACE,
            "root",
            "tbf",
            "rate",
            &format!("{bits_per_s}bit"),
            "burst",
            &burst_bytes.to_string(),
            "latency",
            "100ms",
        ])
    }

    /// Removes the rate limit.
    pub fn clear_rate_limit(&self) -> Result<()> {
        tc(&[
            "-n",
            &self.namespace,
            "qdisc",
            "del",
            "dev",
            INTERFACE,
            "root",
        ])
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run_tool("ip", args)
}

fn tc(args: &[&str]) -> Result<()> {
    run_tool("tc", args)
}

fn run_tool(tool: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {tool} (iproute2)"))?;
    if !output.status.success() {
        bail!(
            "{tool} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes namespaces of this module whose test process is gone.
fn remove_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        let gone = !std::path::Path::new("/proc").join(pid).exists();
        if gone && pid.parse::<u32>().is_ok() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::require::require_ok;
    use std::io::Read;

    /// True when `from` reaches `to`: a TCP connect (bash's `/dev/tcp`) to a port nobody
    /// listens on is refused, which only a host that got the connect answers; without a
    /// path it fails otherwise (no route, or no answer within the bound).
    fn reachable(from: &Host, to: &Host) -> Result<bool> {
        let script = format!("exec 3<>/dev/tcp/{}/9", to.address);
        let output = from
            .command("timeout")
            .args(["2", "bash", "-c", &script])
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        Ok(stderr.contains("Connection refused"))
    }

    #[test]
    fn hosts_reach_each_other_until_a_link_goes_down() -> Result<()> {
        let Some(network) = require_ok("network namespaces (root, iproute2)", Network::new(2))
        else {
            return Ok(());
        };
        let (a, b) = (network.host(0), network.host(1));
        assert_eq!(a.address, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(b.address, Ipv4Addr::new(10, 77, 0, 2));
        assert!(reachable(a, b)?, "a reaches b");
        b.set_link(false)?;
        assert!(!reachable(a, b)?, "b's link is down");
        b.set_link(true)?;
        assert!(reachable(a, b)?, "b is back");
        a.limit_rate(8_000_000)?;
        assert!(reachable(a, b)?, "a rate limit still passes traffic");
        a.clear_rate_limit()?;
        let names: Vec<String> = network
            .hosts()
            .iter()
            .map(|h| h.namespace.clone())
            .collect();
        drop(network);
        let list = Command::new("ip").args(["netns", "list"]).output()?;
        let list = String::from_utf8_lossy(&list.stdout);
        for name in names {
            assert!(!list.contains(&name), "{name} is left after the drop");
        }
        Ok(())
    }

    #[test]
    fn three_hosts_share_a_switch_and_processes_run_inside() -> Result<()> {
        let Some(network) = require_ok("network namespaces (root, iproute2)", Network::new(3))
        else {
            return Ok(());
        };
        for (from, to) in [(0, 1), (1, 2), (2, 0)] {
            assert!(
                reachable(network.host(from), network.host(to))?,
                "{from} -> {to}"
            );
        }
        let mut child = network
            .host(2)
            .command("ip")
            .args(["-brief", "addr", "show", INTERFACE])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut shown = String::new();
        child
            .stdout
            .take()
            .context("stdout")?
            .read_to_string(&mut shown)?;
        child.wait()?;
        assert!(shown.contains("10.77.0.3/24"), "{shown}");
        Ok(())
    }
}
