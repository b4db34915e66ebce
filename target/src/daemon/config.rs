//! The configuration file: the same JSON `save_config` writes.
//!
//! Like SPDK's, a configuration is a list of subsystems, each a list of RPC
//! calls (`method` + `params`) that rebuild its state. Starting from a file
//! replays those calls through the same method registry the admin socket
//! uses, so a config can express exactly what an admin can do, and every
//! call is checked exactly as it would be over the socket.

use crate::rpc::{MethodRegistry, RpcError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Subsystems in the order they are replayed (later ones refer to earlier ones).
pub const SUBSYSTEM_ORDER: &[&str] = &["bdev", "mirror", "nvmf", "iscsi"];

/// One RPC call of a configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigCall {
    /// RPC method name.
    pub method: String,
    /// Its parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
}

/// One subsystem's calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    /// Subsystem name ("bdev", ...).
    pub subsystem: String,
    /// Calls that rebuild it, in order.
    #[serde(default)]
    pub config: Vec<ConfigCall>,
}

/// A whole configuration file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Subsystems.
    pub subsystems: Vec<SubsystemConfig>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The JSON is malformed or not shaped like a config.
    #[error("config {path} is not valid: {source}")]
    Parse {
        /// The file.
        path: String,
        /// What serde said (with line and column).
        source: serde_json::Error,
    },
    /// A subsystem nobody knows.
    #[error("config names unknown subsystem '{0}' (known: {known})", known = SUBSYSTEM_ORDER.join(", "))]
    UnknownSubsystem(String),
    /// A call failed.
    #[error("config subsystem '{subsystem}', entry {index} ({method}): {error}")]
    Call {
        /// Subsystem of the failing call.
        subsystem: String,
        /// Position within the subsystem, from 0.
        index: usize,
        /// Method of the failing call.
        method: String,
        /// The RPC error it returned.
        error: RpcError,
    },
}

impl ConfigFile {
    /// Reads and parses a file.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Replays every call through `methods`, subsystems in dependency order.
    pub fn apply(&self, methods: &MethodRegistry) -> Result<usize, ConfigError> {
        for s in &self.subsystems {
            if !SUBSYSTEM_ORDER.contains(&s.subsystem.as_str()) {
                return Err(ConfigError::UnknownSubsystem(s.subsystem.clone()));
            }
        }
        let mut applied = 0;
        for name in SUBSYSTEM_ORDER {
            for s in self.subsystems.iter().filter(|s| s.subsystem == *name) {
                for (index, call) in s.config.iter().enumerate() {
                    methods
                        .call(&call.method, call.params.clone())
                        .map_err(|error| ConfigError::Call {
                            subsystem: s.subsystem.clone(),
                            index,
                            method: call.method.clone(),
                            error,
                        })?;
                    applied += 1;
                }
            }
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_subsystems_are_rejected() {
        let err = serde_json::from_str::<ConfigFile>(r#"{"subsystems": [], "extra": 1}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("extra"));
        let cfg: ConfigFile =
            serde_json::from_str(r#"{"subsystems": [{"subsystem": "nope", "config": []}]}"#)
                .expect("shape is fine");
        let methods = MethodRegistry::new();
        assert!(matches!(
            cfg.apply(&methods),
            Err(ConfigError::UnknownSubsystem(s)) if s == "nope"
        ));
    }

    #[test]
    fn a_failing_call_names_its_place() {
        let cfg: ConfigFile = serde_json::from_str(
            r#"{"subsystems": [{"subsystem": "bdev", "config": [{"method": "no_such_method"}]}]}"#,
        )
        .expect("parses");
        let err = cfg.apply(&MethodRegistry::new()).expect_err("fails");
        let text = err.to_string();
        assert!(
            text.contains("entry 0") && text.contains("no_such_method"),
            "{text}"
        );
    }
}

/// Parses arbitrary bytes as a configuration and replays it against a
/// registry whose methods only check their params; for a cargo-fuzz target.
pub fn fuzz_config(data: &[u8]) {
    let Ok(cfg) = serde_json::from_slice::<ConfigFile>(data) else {
        return;
    };
    let methods = MethodRegistry::new();
    let _ = methods.register("bdev_malloc_create", |p| {
        crate::rpc::parse_params::<crate::volume::registry::MallocParams>(p)?;
        Ok(serde_json::Value::Bool(true))
    });
    let _ = cfg.apply(&methods);
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            super::fuzz_config(&data);
        }

        #[test]
        fn config_shaped_json_never_panics(
            methods in proptest::collection::vec("[a-z_]{0,24}", 0..6),
            blocks in any::<u64>(),
            bs in any::<u32>(),
        ) {
            let calls: Vec<_> = methods.iter().map(|m| serde_json::json!({
                "method": m, "params": {"num_blocks": blocks, "block_size": bs}
            })).collect();
            let cfg = serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": calls}]});
            super::fuzz_config(cfg.to_string().as_bytes());
        }
    }
}
