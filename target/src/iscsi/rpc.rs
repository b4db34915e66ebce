//! The iSCSI admin methods, with SPDK's names and parameters, and the
//! "iscsi" subsystem of `save_config`.
//!
//! Handlers run on admin threads: they change the model in
//! [`IscsiTarget`] and bind or stop listeners; connections pick changes up
//! at their next login (or are shut down when their node is deleted).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::portal;
use super::registry::{
    AuthGroupSpec, ChapSecret, InitiatorGroupSpec, IscsiTarget, ModelError, PortalGroupSpec,
    TargetNodeSpec,
};
use crate::daemon::config::ConfigCall;
use crate::rpc::{parse_params, MethodRegistry, RegisterError, RpcError};

fn err(e: ModelError) -> RpcError {
    let code = match &e {
        ModelError::Invalid(_) => return RpcError::invalid_params(e.to_string()),
        ModelError::Exists(_) => -libc::EEXIST,
        ModelError::NotFound(_) => -libc::ENODEV,
        ModelError::InUse(_) => -libc::EBUSY,
        ModelError::Listen { .. } => -libc::EADDRINUSE,
    };
    RpcError::app(code, e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tag16 {
    tag: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tag32 {
    tag: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeName {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddSecret {
    tag: u32,
    user: String,
    secret: String,
    #[serde(default)]
    muser: Option<String>,
    #[serde(default)]
    msecret: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetAuth {
    name: String,
    #[serde(default)]
    chap_group: Option<u32>,
    #[serde(default)]
    disable_chap: bool,
    #[serde(default)]
    require_chap: bool,
    #[serde(default)]
    mutual_chap: bool,
    #[serde(default)]
    chap: Option<ChapSecret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoveryAuth {
    #[serde(default)]
    chap_group: Option<u32>,
    #[serde(default)]
    disable_chap: bool,
    #[serde(default)]
    require_chap: bool,
    #[serde(default)]
    mutual_chap: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NopParams {
    #[serde(default)]
    nop_timeout: Option<u64>,
    #[serde(default)]
    nop_in_interval: Option<u64>,
}

/// Registers every `iscsi_*` method.
pub fn register(methods: &MethodRegistry, t: &Arc<IscsiTarget>) -> Result<(), RegisterError> {
    let s = t.clone();
    methods.register("iscsi_create_portal_group", move |p| {
        let spec: PortalGroupSpec = parse_params(p)?;
        portal::create_portal_group(&s, spec).map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_delete_portal_group", move |p| {
        let tag: Tag16 = parse_params(p)?;
        portal::delete_portal_group(&s, tag.tag).map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_get_portal_groups", move |p| {
        let _: NoParams = parse_params(p)?;
        let v: Vec<Value> = s
            .portal_groups()
            .into_iter()
            .map(|(spec, bound)| {
                json!({
                    "tag": spec.tag,
                    "private": spec.private,
                    "portals": bound.iter().map(|a| json!({
                        "host": a.ip().to_string(),
                        "port": a.port().to_string(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        Ok(Value::Array(v))
    })?;
    let s = t.clone();
    methods.register("iscsi_create_initiator_group", move |p| {
        let spec: InitiatorGroupSpec = parse_params(p)?;
        s.add_initiator_group(spec).map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_delete_initiator_group", move |p| {
        let tag: Tag16 = parse_params(p)?;
        s.remove_initiator_group(tag.tag).map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_get_initiator_groups", move |p| {
        let _: NoParams = parse_params(p)?;
        serde_json::to_value(s.initiator_groups()).map_err(RpcError::internal)
    })?;
    let s = t.clone();
    methods.register("iscsi_create_auth_group", move |p| {
        let spec: AuthGroupSpec = parse_params(p)?;
        s.add_auth_group(spec).map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_delete_auth_group", move |p| {
        let tag: Tag32 = parse_params(p)?;
        s.remove_auth_group(tag.tag).map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_auth_group_add_secret", move |p| {
        let a: AddSecret = parse_params(p)?;
        s.add_auth_secret(
            a.tag,
            ChapSecret {
                user: a.user,
                secret: a.secret,
                muser: a.muser,
                msecret: a.msecret,
            },
        )
        .map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_get_auth_groups", move |p| {
        let _: NoParams = parse_params(p)?;
        // Secrets are not echoed back.
        let v: Vec<Value> = s
            .auth_groups()
            .into_iter()
            .map(|g| {
                json!({
                    "tag": g.tag,
                    "secrets": g.secrets.iter().map(|c| json!({
                        "user": c.user,
                        "muser": c.muser,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        Ok(Value::Array(v))
    })?;
    let s = t.clone();
    methods.register("iscsi_set_discovery_auth", move |p| {
        let a: DiscoveryAuth = parse_params(p)?;
        let require = !a.disable_chap && (a.require_chap || a.mutual_chap);
        s.set_discovery_auth(require, a.mutual_chap, a.chap_group)
            .map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_set_options", move |p| {
        let a: NopParams = parse_params(p)?;
        let mut nop = s.nop.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = a.nop_in_interval {
            nop.0 = v;
        }
        if let Some(v) = a.nop_timeout {
            nop.1 = v;
        }
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_create_target_node", move |p| {
        let spec: TargetNodeSpec = parse_params(p)?;
        let name = s.add_target_node(spec).map_err(err)?;
        tracing::info!(target = name, "created iSCSI target node");
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_delete_target_node", move |p| {
        let n: NodeName = parse_params(p)?;
        s.remove_target_node(&n.name).map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_target_node_set_auth", move |p| {
        let a: SetAuth = parse_params(p)?;
        if a.disable_chap && (a.require_chap || a.mutual_chap) {
            return Err(RpcError::invalid_params(
                "disable_chap conflicts with require_chap/mutual_chap",
            ));
        }
        s.set_node_auth(&a.name, |spec| {
            spec.chap_group = a.chap_group.or(spec.chap_group);
            spec.disable_chap = a.disable_chap;
            spec.require_chap = a.require_chap;
            spec.mutual_chap = a.mutual_chap;
            if a.chap.is_some() {
                spec.chap = a.chap;
            }
        })
        .map_err(err)?;
        Ok(Value::Bool(true))
    })?;
    let s = t.clone();
    methods.register("iscsi_get_target_nodes", move |p| {
        let _: NoParams = parse_params(p)?;
        let v: Vec<Value> = s
            .target_nodes()
            .into_iter()
            .map(|n| {
                json!({
                    "name": n.name,
                    "alias_name": n.spec.alias_name.clone().unwrap_or_default(),
                    "pg_ig_maps": n.spec.pg_ig_maps,
                    "luns": n.spec.luns,
                    "queue_depth": n.spec.queue_depth,
                    "disable_chap": n.spec.disable_chap,
                    "require_chap": n.spec.require_chap,
                    "mutual_chap": n.spec.mutual_chap,
                    "chap_group": n.spec.chap_group.unwrap_or(0),
                    "header_digest": n.spec.header_digest,
                    "data_digest": n.spec.data_digest,
                    "sessions": s.sessions_of(&n.name).len(),
                })
            })
            .collect();
        Ok(Value::Array(v))
    })?;
    let s = t.clone();
    methods.register("iscsi_get_connections", move |p| {
        let _: NoParams = parse_params(p)?;
        let mut v = Vec::new();
        for sess in s.sessions() {
            for c in sess.conn_infos() {
                let isid: String = sess.isid.0.iter().map(|b| format!("{b:02x}")).collect();
                v.push(json!({
                    "id": c.id,
                    "cid": c.cid,
                    "tsih": sess.tsih.0,
                    "isid": isid,
                    "lcore_id": c.reactor,
                    "initiator_addr": c.initiator_addr.ip().to_string(),
                    "initiator_port": c.initiator_addr.port(),
                    "target_addr": c.target_addr.ip().to_string(),
                    "target_port": c.target_addr.port(),
                    "initiator_node_name": sess.initiator_name,
                    "target_node_name": sess.target_name.clone().unwrap_or_default(),
                    "session_type": format!("{:?}", sess.session_type),
                    "header_digest": format!("{:?}", sess.params.header_digest),
                    "data_digest": format!("{:?}", sess.params.data_digest),
                }));
            }
        }
        Ok(Value::Array(v))
    })?;
    Ok(())
}

/// The calls that rebuild the iSCSI configuration (`save_config`).
pub fn config_calls(t: &IscsiTarget) -> Vec<ConfigCall> {
    let mut calls = Vec::new();
    let call = |method: &str, params: Value| ConfigCall {
        method: method.to_string(),
        params: Some(params),
    };
    {
        let nop = *t.nop.lock().unwrap_or_else(|e| e.into_inner());
        calls.push(call(
            "iscsi_set_options",
            json!({"nop_in_interval": nop.0, "nop_timeout": nop.1}),
        ));
    }
    for g in t.auth_groups() {
        if let Ok(v) = serde_json::to_value(&g) {
            calls.push(call("iscsi_create_auth_group", v));
        }
    }
    if let Some((require, mutual, group)) = t.discovery_auth() {
        calls.push(call(
            "iscsi_set_discovery_auth",
            json!({"require_chap": require, "mutual_chap": mutual, "chap_group": group}),
        ));
    }
    for (spec, _) in t.portal_groups() {
        if let Ok(v) = serde_json::to_value(&spec) {
            calls.push(call("iscsi_create_portal_group", v));
        }
    }
    for ig in t.initiator_groups() {
        if let Ok(v) = serde_json::to_value(&ig) {
            calls.push(call("iscsi_create_initiator_group", v));
        }
    }
    for n in t.target_nodes() {
        if let Ok(v) = serde_json::to_value(&n.spec) {
            calls.push(call("iscsi_create_target_node", v));
        }
    }
    calls
}

/// Exports `volume` as `iqn.2026-11.io.mirrorpoint:<volume>` LUN 0 on
/// `addr` to any initiator without CHAP (the daemon's default configuration).
pub fn export_default(
    t: &Arc<IscsiTarget>,
    volume: &str,
    addr: &str,
) -> Result<String, ModelError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| ModelError::Invalid(format!("bad address {addr}")))?;
    portal::create_portal_group(
        t,
        PortalGroupSpec {
            tag: 1,
            portals: vec![super::registry::PortalSpec {
                host: host.to_string(),
                port: port.to_string(),
            }],
            private: false,
        },
    )?;
    t.add_initiator_group(InitiatorGroupSpec {
        tag: 1,
        initiators: vec!["ANY".into()],
        netmasks: vec!["ANY".into()],
    })?;
    t.add_target_node(TargetNodeSpec {
        name: volume.to_string(),
        alias_name: Some(volume.to_string()),
        luns: vec![super::registry::LunSpec {
            bdev_name: volume.to_string(),
            lun_id: 0,
        }],
        pg_ig_maps: vec![super::registry::PgIgMap {
            pg_tag: 1,
            ig_tag: 1,
        }],
        queue_depth: super::registry::DEFAULT_QUEUE_DEPTH,
        disable_chap: true,
        require_chap: false,
        mutual_chap: false,
        chap_group: None,
        chap: None,
        header_digest: false,
        data_digest: false,
    })
}
