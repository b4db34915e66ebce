//! Consistency groups: mirrors that share one sequencer, so that one
//! atomic add splits all of them at the same point of their common write
//! stream.
//!
//! A group is a named [`SplitGate`] that its members stamp their writes
//! with. A member joins by switching from its own gate to the group's
//! ([`Mirror::join_gate`]): the switch waits until no write stamped by the
//! old gate is in flight, so a group split never misses one. Because one
//! `fetch_add` orders every member's writes, a group split gives mutually
//! consistent images: a write that completed (on any member) before a
//! dependent write was issued (on any member) has a lower sequence number,
//! so the images never hold the dependent write without the one it depends
//! on. The group's gate starts above every member's epoch and sequence so
//! a member's split leg (which skips every epoch from its split on) stays
//! split. Leaving is for good until a restart (`mirror_group_delete` only
//! forgets the name; the members keep stamping from the shared gate, which
//! is harmless) because swapping the gate back would need the same drain
//! for no gain.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::engine::Mirror;
use super::service::{err, lock, SvcError};
use super::split::SplitGate;
use crate::daemon::DaemonState;

/// `mirror_group_create` parameters (also what save_config replays).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupParams {
    /// Group name.
    pub name: String,
    /// Member mirrors.
    pub mirrors: Vec<String>,
}

/// A consistency group.
pub struct Group {
    /// Its parameters.
    pub params: GroupParams,
    gate: Arc<SplitGate>,
}

fn mirror(state: &DaemonState, name: &str) -> Result<Arc<Mirror>, SvcError> {
    state
        .mirror
        .mirrors()
        .into_iter()
        .find(|m| m.name() == name)
        .ok_or_else(|| err(libc::EINVAL, format!("mirrors: no mirror named '{name}'")))
}

/// `mirror_group_create`.
pub fn create(state: &DaemonState, p: GroupParams) -> Result<Value, SvcError> {
    if p.name.is_empty() || p.name.len() > 200 {
        return Err(err(libc::EINVAL, "name: 1 to 200 characters"));
    }
    if p.mirrors.is_empty() {
        return Err(err(libc::EINVAL, "mirrors: at least one mirror"));
    }
    let mut sorted = p.mirrors.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != p.mirrors.len() {
        return Err(err(libc::EINVAL, "mirrors: a mirror is named twice"));
    }
    let members = p
        .mirrors
        .iter()
        .map(|n| mirror(state, n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut groups = lock(&state.mirror.groups);
    if groups.iter().any(|g| g.params.name == p.name) {
        return Err(err(libc::EEXIST, format!("group '{}' exists", p.name)));
    }
    if let Some(g) = groups
        .iter()
        .find(|g| g.params.mirrors.iter().any(|m| p.mirrors.contains(m)))
    {
        return Err(err(
            libc::EBUSY,
            format!("a member already belongs to group '{}'", g.params.name),
        ));
    }
    let epoch = members
        .iter()
        .map(|m| m.gate().peek().epoch)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    let seq = members
        .iter()
        .map(|m| m.gate().peek().seq)
        .max()
        .unwrap_or(0);
    let gate = Arc::new(SplitGate::new(epoch, seq));
    for m in &members {
        m.join_gate(gate.clone(), Duration::from_secs(10))
            .map_err(|e| err(libc::EBUSY, e))?;
    }
    groups.push(Group {
        params: p.clone(),
        gate,
    });
    tracing::info!(group = p.name, members = ?p.mirrors, "consistency group created");
    Ok(json!({"name": p.name, "mirrors": p.mirrors, "epoch": epoch}))
}

/// `mirror_group_delete`: forgets the group (the members keep its sequencer
/// until a restart; see the module notes).
pub fn delete(state: &DaemonState, name: &str) -> Result<Value, SvcError> {
    let mut groups = lock(&state.mirror.groups);
    let before = groups.len();
    groups.retain(|g| g.params.name != name);
    if groups.len() == before {
        return Err(err(libc::ENODEV, format!("no group named '{name}'")));
    }
    Ok(Value::Bool(true))
}

/// `mirror_group_get`.
pub fn get(state: &DaemonState, name: Option<&str>) -> Result<Value, SvcError> {
    let groups = lock(&state.mirror.groups);
    let out: Vec<Value> = groups
        .iter()
        .filter(|g| name.map_or(true, |n| n == g.params.name))
        .map(|g| {
            let next = g.gate.peek();
            json!({"name": g.params.name, "mirrors": g.params.mirrors, "epoch": next.epoch, "next_seq": next.seq})
        })
        .collect();
    if let (Some(n), true) = (name, out.is_empty()) {
        return Err(err(libc::ENODEV, format!("no group named '{n}'")));
    }
    Ok(Value::Array(out))
}

/// The members of group `name`.
pub fn members(state: &DaemonState, name: &str) -> Result<Vec<Arc<Mirror>>, SvcError> {
    let names = lock(&state.mirror.groups)
        .iter()
        .find(|g| g.params.name == name)
        .map(|g| g.params.mirrors.clone())
        .ok_or_else(|| err(libc::ENODEV, format!("no group named '{name}'")))?;
    names.iter().map(|n| mirror(state, n)).collect()
}
