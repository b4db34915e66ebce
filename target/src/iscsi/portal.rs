//! Portal group listeners: bind on the control plane, accept on a reactor.
//!
//! A portal's socket is bound by the RPC thread (so a bad address or a port
//! in use is reported to the caller), then moved to the first reactor, which
//! runs an [`Acceptor`] spreading connections round-robin over every
//! reactor. The acceptor task is kept in a per-reactor table keyed by a
//! listener id; deleting the portal group drops that task, which cancels
//! the pending accept and closes the socket.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener, ToSocketAddrs};
use std::sync::Arc;

use mirrorpoint_poller::{spawn, Task};
use mirrorpoint_transport::{Acceptor, TcpListener};

use super::conn;
use super::registry::{IscsiTarget, ModelError, PortalGroupSpec};

thread_local! {
    static LISTENERS: RefCell<HashMap<u64, Task<()>>> = RefCell::new(HashMap::new());
}

fn resolve(host: &str, port: &str) -> Result<SocketAddr, ModelError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| ModelError::Invalid(format!("bad port '{port}'")))?;
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ModelError::Invalid(format!("bad host '{host}'")))
}

/// Creates a portal group: binds its portals and starts accepting.
pub fn create_portal_group(
    target: &Arc<IscsiTarget>,
    spec: PortalGroupSpec,
) -> Result<Vec<SocketAddr>, ModelError> {
    target.check_new_portal_group(&spec)?;
    let reactor = target
        .reactors
        .first()
        .cloned()
        .ok_or_else(|| ModelError::Invalid("no reactors".into()))?;
    let mut bound = Vec::new();
    for p in &spec.portals {
        let addr = resolve(&p.host, &p.port)?;
        let l = StdTcpListener::bind(addr).map_err(|e| ModelError::Listen {
            addr: addr.to_string(),
            why: e.to_string(),
        })?;
        let local = l.local_addr().unwrap_or(addr);
        bound.push((l, local));
    }
    let mut listeners = Vec::new();
    let addrs: Vec<SocketAddr> = bound.iter().map(|b| b.1).collect();
    for (l, local) in bound {
        let id = target.next_id();
        let t = target.clone();
        let tag = spec.tag;
        let reactors = target.reactors.clone();
        let started = reactor.block_on(move || async move {
            let listener = match TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => return Err(e.to_string()),
            };
            let acceptor = Acceptor::new(listener, reactors).map_err(|e| e.to_string())?;
            let task = spawn(async move {
                let t2 = t.clone();
                let r = acceptor
                    .run(move |stream, peer| conn::serve(t2.clone(), stream, peer, tag))
                    .await;
                if let Err(e) = r {
                    tracing::error!("iSCSI portal group {tag}: accept failed: {e}");
                }
            });
            LISTENERS.with(|m| m.borrow_mut().insert(id, task));
            Ok(())
        });
        match started {
            Ok(Ok(())) => listeners.push((local, id)),
            Ok(Err(why)) => {
                stop_listeners(target, listeners.iter().map(|l| l.1).collect());
                return Err(ModelError::Listen {
                    addr: local.to_string(),
                    why,
                });
            }
            Err(_) => {
                stop_listeners(target, listeners.iter().map(|l| l.1).collect());
                return Err(ModelError::Listen {
                    addr: local.to_string(),
                    why: "reactor stopped".into(),
                });
            }
        }
        tracing::info!("iSCSI portal group {} listening on {local}", spec.tag);
    }
    if let Err(e) = target.add_portal_group(spec, listeners.clone()) {
        stop_listeners(target, listeners.iter().map(|l| l.1).collect());
        return Err(e);
    }
    Ok(addrs)
}

/// Stops listeners by id (their acceptor tasks are dropped on the reactor).
pub fn stop_listeners(target: &IscsiTarget, ids: Vec<u64>) {
    if ids.is_empty() {
        return;
    }
    if let Some(r) = target.reactors.first() {
        let _ = r.block_on(move || async move {
            LISTENERS.with(|m| {
                let mut m = m.borrow_mut();
                for id in ids {
                    m.remove(&id);
                }
            });
        });
    }
}

/// Deletes a portal group (refused while a target node maps it).
pub fn delete_portal_group(target: &IscsiTarget, tag: u16) -> Result<(), ModelError> {
    let ids = target.remove_portal_group(tag)?;
    stop_listeners(target, ids);
    Ok(())
}
