//! The two-site in-process setup most mirror tests start from: site east
//! (`a`, domain 1, 127.0.0.2, master) and site west (`b`, domain 2,
//! 127.0.0.3) whose storage servers will hold the leg, peered (optionally
//! through a fault-injecting [`Proxy`] on 127.0.0.4), with west's capacity
//! report seen at the master.

use super::{wait_for, Proxy, Site, TempDir};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

pub struct TwoSites {
    pub dir: TempDir,
    pub a: Site,
    pub b: Site,
    /// `servers[i]` backs storage server `i + 1` (volume `s{i+1}`) on b.
    pub servers: Vec<PathBuf>,
    /// East's route to west, when asked for.
    pub proxy: Option<Proxy>,
}

/// Starts both sites in `TempDir::new(tag)`; b gets one storage server per
/// entry of `server_sizes` (a uring volume of that size); east reaches west
/// through a proxy if `with_proxy`. Waits up to 10 s for the capacity report.
pub fn two_sites(tag: &str, server_sizes: &[u64], with_proxy: bool) -> TwoSites {
    let dir = TempDir::new(tag);
    let mut a = Site::start(&dir.0.join("a"), "east", 1, "127.0.0.2", true);
    let mut b = Site::start(&dir.0.join("b"), "west", 2, "127.0.0.3", false);
    let servers: Vec<PathBuf> = server_sizes
        .iter()
        .enumerate()
        .map(|(i, size)| b.uring(&format!("s{}", i + 1), *size))
        .collect();
    for i in 1..=servers.len() {
        b.call(
            "agent_add_storage_server",
            json!({"name": format!("ss{i}"), "id": i, "volumes": [format!("s{i}")]}),
        );
    }
    let proxy = with_proxy.then(|| Proxy::start("127.0.0.4", b.addr));
    let west = proxy.as_ref().map_or(b.addr, |p| p.addr);
    a.call(
        "agent_add_peer",
        json!({"name": "west", "domain": 2, "address": west.to_string()}),
    );
    b.call(
        "agent_add_peer",
        json!({"name": "east", "domain": 1, "address": a.addr.to_string(), "master": true}),
    );
    wait_for(
        Duration::from_secs(10),
        "the remote agent's capacity report",
        || !a.call("agent_get_sites", json!({}))["peers"][0]["last_report_ms"].is_null(),
    );
    TwoSites {
        dir,
        a,
        b,
        servers,
        proxy,
    }
}
