//! The `nvmf_*` admin methods (SPDK's names and parameter shapes where they
//! apply) and the "nvmf" part of save_config.
//!
//! Handlers run on admin-socket threads and only touch control-plane state
//! of the [`NvmfTarget`]; binding a listener is a non-blocking `bind` and the
//! accept loop is posted to a reactor. save_config writes the calls that
//! rebuild the target (transport, then per subsystem: create, namespaces,
//! hosts, listeners), replayed after "bdev" so namespaces find their volumes.

use super::subsystem::{
    format_nguid, format_uuid, ListenAddress, NamespaceParams, Subsystem, SubsystemError,
};
use super::target::{NvmfTarget, TransportOptions};
use crate::daemon::config::ConfigCall;
use crate::daemon::DaemonState;
use crate::rpc::{parse_params, MethodRegistry, RegisterError, RpcError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Maps a subsystem error onto an RPC error (negative errnos, as SPDK).
pub fn rpc_error(e: SubsystemError) -> RpcError {
    match e {
        SubsystemError::Invalid(m) => RpcError::invalid_params(m),
        SubsystemError::Exists(m) => RpcError::app(-libc::EEXIST, m),
        SubsystemError::NotFound(m) => RpcError::app(-libc::ENODEV, m),
        SubsystemError::Unavailable(m) => RpcError::app(-libc::EBUSY, m),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTransport {
    trtype: String,
    #[serde(default)]
    in_capsule_data_size: Option<u32>,
    #[serde(default)]
    max_io_size: Option<u32>,
    #[serde(default)]
    io_unit_size: Option<u32>,
    #[serde(default)]
    max_queue_depth: Option<u16>,
    #[serde(default)]
    max_io_qpairs_per_ctrlr: Option<u16>,
    #[serde(default)]
    max_r2t_per_command: Option<u32>,
    #[serde(default)]
    c2h_success: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSubsystem {
    nqn: String,
    #[serde(default)]
    serial_number: Option<String>,
    #[serde(default)]
    model_number: Option<String>,
    #[serde(default)]
    allow_any_host: bool,
    #[serde(default)]
    max_namespaces: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nqn {
    nqn: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNs {
    nqn: String,
    namespace: NamespaceParams,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveNs {
    nqn: String,
    nsid: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Listener {
    nqn: String,
    listen_address: ListenAddress,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Host {
    nqn: String,
    host: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowAny {
    nqn: String,
    allow_any_host: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptionalNqn {
    #[serde(default)]
    nqn: Option<String>,
}

/// Creates the subsystem `params` describes (`nvmf_create_subsystem`).
pub fn create_subsystem(t: &NvmfTarget, params: Value) -> Result<Value, RpcError> {
    let p: CreateSubsystem = parse_params(Some(params))?;
    let s = Subsystem::new(
        &p.nqn,
        p.serial_number.as_deref(),
        p.model_number.as_deref(),
        p.allow_any_host,
        p.max_namespaces,
    )
    .map_err(rpc_error)?;
    t.add_subsystem(s).map_err(rpc_error)?;
    tracing::info!(nqn = p.nqn, "created NVMe-oF subsystem");
    Ok(Value::Bool(true))
}

/// Registers every `nvmf_*` method.
pub fn register(methods: &MethodRegistry, state: &Arc<DaemonState>) -> Result<(), RegisterError> {
    let target = &state.nvmf;
    let t = target.clone();
    methods.register("nvmf_create_transport", move |p| {
        let p: CreateTransport = parse_params(p)?;
        if !p.trtype.eq_ignore_ascii_case("tcp") {
            return Err(RpcError::invalid_params(format!(
                "trtype '{}' is not supported (only TCP)",
                p.trtype
            )));
        }
        let d = TransportOptions::defaults(t.chunk_size());
        let opts = TransportOptions {
            in_capsule_data_size: p.in_capsule_data_size.unwrap_or(d.in_capsule_data_size),
            max_io_size: p.max_io_size.unwrap_or(d.max_io_size),
            io_unit_size: p.io_unit_size.unwrap_or(d.io_unit_size),
            max_queue_depth: p.max_queue_depth.unwrap_or(d.max_queue_depth),
            max_io_qpairs_per_ctrlr: p
                .max_io_qpairs_per_ctrlr
                .unwrap_or(d.max_io_qpairs_per_ctrlr),
            max_r2t_per_command: p.max_r2t_per_command.unwrap_or(d.max_r2t_per_command),
            c2h_success: p.c2h_success.unwrap_or(d.c2h_success),
        };
        t.create_transport(opts).map_err(rpc_error)?;
        Ok(Value::Bool(true))
    })?;
    let t = target.clone();
    methods.register("nvmf_get_transports", move |p| {
        let _: OptionalNqn = parse_params(p)?;
        let o = t.transport();
        Ok(json!([transport_json(&o)]))
    })?;
    let t = target.clone();
    methods.register("nvmf_create_subsystem", move |p| {
        create_subsystem(&t, p.unwrap_or(Value::Null))
    })?;
    let t = target.clone();
    methods.register("nvmf_delete_subsystem", move |p| {
        let p: Nqn = parse_params(p)?;
        t.delete_subsystem(&p.nqn).map_err(rpc_error)?;
        Ok(Value::Bool(true))
    })?;
    let t = target.clone();
    let st = state.clone();
    methods.register("nvmf_subsystem_add_ns", move |p| {
        let p: AddNs = parse_params(p)?;
        let s = t.nvm_subsystem(&p.nqn).map_err(rpc_error)?;
        let v = st.volumes.get(&p.namespace.bdev_name).ok_or_else(|| {
            RpcError::app(
                -libc::ENODEV,
                format!(
                    "No such device: no volume named '{}'",
                    p.namespace.bdev_name
                ),
            )
        })?;
        let nsid = s.add_namespace(v, p.namespace).map_err(rpc_error)?;
        Ok(json!(nsid))
    })?;
    let t = target.clone();
    methods.register("nvmf_subsystem_remove_ns", move |p| {
        let p: RemoveNs = parse_params(p)?;
        let s = t.nvm_subsystem(&p.nqn).map_err(rpc_error)?;
        s.remove_namespace(p.nsid).map_err(rpc_error)?;
        Ok(Value::Bool(true))
    })?;
    let t = target.clone();
    methods.register("nvmf_subsystem_add_listener", move |p| {
        let p: Listener = parse_params(p)?;
        let bound = t
            .add_listener(&p.nqn, &p.listen_address)
            .map_err(rpc_error)?;
        serde_json::to_value(ListenAddress::from_addr(bound)).map_err(RpcError::internal)
    })?;
    let t = target.clone();
    methods.register("nvmf_subsystem_remove_listener", move |p| {
        let p: Listener = parse_params(p)?;
        t.remove_listener(&p.nqn, &p.listen_address)
            .map_err(rpc_error)?;
        Ok(Value::Bool(true))
    })?;
    let t = target.clone();
    methods.register("nvmf_subsystem_add_host", move |p| {
        let p: Host = parse_params(p)?;
        t.nvm_subsystem(&p.nqn)
            .map_err(rpc_error)?
            .add_host(&p.host)
            .map_err(rpc_error)?;
        Ok(Value::Bool(true))
    })?;
    let t = target.clone();
    methods.register("nvmf_subsystem_remove_host", move |p| {
        let p: Host = parse_params(p)?;
        t.nvm_subsystem(&p.nqn)
            .map_err(rpc_error)?
            .remove_host(&p.host)
            .map_err(rpc_error)?;
        Ok(Value::Bool(true))
    })?;
    let t = target.clone();
    methods.register("nvmf_subsystem_allow_any_host", move |p| {
        let p: AllowAny = parse_params(p)?;
        t.nvm_subsystem(&p.nqn)
            .map_err(rpc_error)?
            .set_allow_any_host(p.allow_any_host);
        t.discovery_changed();
        Ok(Value::Bool(true))
    })?;
    let t = target.clone();
    methods.register("nvmf_subsystem_get_controllers", move |p| {
        let p: Nqn = parse_params(p)?;
        let s = t.subsystem(&p.nqn).ok_or_else(|| {
            rpc_error(SubsystemError::NotFound(format!(
                "no subsystem '{}'",
                p.nqn
            )))
        })?;
        let list: Vec<Value> = s
            .controllers()
            .iter()
            .filter(|c| !c.is_dead())
            .map(|c| {
                json!({
                    "cntlid": c.cntlid,
                    "hostnqn": c.hostnqn,
                    "hostid": format_uuid(&c.hostid),
                    "num_io_qpairs": c.io_queue_count(),
                    "keep_alive_timeout_ms": c.kato().as_millis() as u64,
                })
            })
            .collect();
        Ok(Value::Array(list))
    })?;
    let t = target.clone();
    methods.register("nvmf_get_subsystems", move |p| {
        let p: OptionalNqn = parse_params(p)?;
        let list: Vec<Value> = t
            .subsystems()
            .iter()
            .filter(|s| p.nqn.as_deref().map_or(true, |n| s.nqn.as_str() == n))
            .map(|s| subsystem_json(s))
            .collect();
        if list.is_empty() {
            if let Some(n) = p.nqn {
                return Err(rpc_error(SubsystemError::NotFound(format!(
                    "no subsystem '{n}'"
                ))));
            }
        }
        Ok(Value::Array(list))
    })?;
    Ok(())
}

fn transport_json(o: &TransportOptions) -> Value {
    json!({
        "trtype": "TCP",
        "in_capsule_data_size": o.in_capsule_data_size,
        "max_io_size": o.max_io_size,
        "io_unit_size": o.io_unit_size,
        "max_queue_depth": o.max_queue_depth,
        "max_io_qpairs_per_ctrlr": o.max_io_qpairs_per_ctrlr,
        "max_r2t_per_command": o.max_r2t_per_command,
        "c2h_success": o.c2h_success,
    })
}

fn subsystem_json(s: &Subsystem) -> Value {
    let pol = s.policy();
    let listen: Vec<Value> = pol
        .listeners
        .iter()
        .map(|a| serde_json::to_value(ListenAddress::from_addr(*a)).unwrap_or(Value::Null))
        .collect();
    let hosts: Vec<Value> = pol.hosts.iter().map(|h| json!({ "nqn": h })).collect();
    if s.discovery {
        return json!({
            "nqn": s.nqn.as_str(),
            "subtype": "Discovery",
            "listen_addresses": listen,
            "allow_any_host": true,
            "hosts": [],
        });
    }
    let (ns, _) = s.namespaces();
    let namespaces: Vec<Value> = ns
        .values()
        .map(|n| {
            json!({
                "nsid": n.nsid,
                "bdev_name": n.volume.name(),
                "name": n.volume.name(),
                "nguid": format_nguid(&n.nguid),
                "uuid": format_uuid(&n.uuid),
            })
        })
        .collect();
    json!({
        "nqn": s.nqn.as_str(),
        "subtype": "NVMe",
        "listen_addresses": listen,
        "allow_any_host": pol.allow_any_host,
        "hosts": hosts,
        "serial_number": s.serial,
        "model_number": s.model,
        "max_namespaces": s.max_namespaces,
        "namespaces": namespaces,
    })
}

/// The calls that rebuild the target, for save_config's "nvmf" subsystem.
pub fn config_calls(t: &NvmfTarget) -> Vec<ConfigCall> {
    let mut out = Vec::new();
    if t.transport_created() {
        out.push(ConfigCall {
            method: "nvmf_create_transport".into(),
            params: Some(transport_json(&t.transport())),
        });
    }
    for s in t.subsystems().iter().filter(|s| !s.discovery) {
        let nqn = s.nqn.as_str();
        let pol = s.policy();
        out.push(ConfigCall {
            method: "nvmf_create_subsystem".into(),
            params: Some(json!({
                "nqn": nqn,
                "serial_number": s.serial,
                "model_number": s.model,
                "allow_any_host": pol.allow_any_host,
                "max_namespaces": s.max_namespaces,
            })),
        });
        let (ns, _) = s.namespaces();
        for n in ns.values() {
            let mut params = n.params.clone();
            params.nsid = Some(n.nsid);
            params.nguid = Some(format_nguid(&n.nguid));
            params.uuid = Some(format_uuid(&n.uuid));
            out.push(ConfigCall {
                method: "nvmf_subsystem_add_ns".into(),
                params: Some(json!({ "nqn": nqn, "namespace": params })),
            });
        }
        for h in &pol.hosts {
            out.push(ConfigCall {
                method: "nvmf_subsystem_add_host".into(),
                params: Some(json!({ "nqn": nqn, "host": h })),
            });
        }
        for a in &pol.listeners {
            out.push(ConfigCall {
                method: "nvmf_subsystem_add_listener".into(),
                params: Some(json!({ "nqn": nqn, "listen_address": ListenAddress::from_addr(*a) })),
            });
        }
    }
    out
}
