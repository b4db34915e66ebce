//! The method table: RPC names mapped to handlers, and request dispatch.
//!
//! Handlers are plain synchronous closures over `Option<Value>` because the
//! admin plane is low-rate and runs on its own threads; a handler that needs
//! the data path hands work to it and waits. The table sits behind an
//! `RwLock` so the daemon can register methods through a shared
//! `Arc<MethodRegistry>` both before and after the server starts, and a
//! handler is called *outside* the lock (it is kept in an `Arc`) so handlers
//! may themselves register methods or take as long as they need without
//! blocking other connections. A panicking handler is caught and reported as
//! -32603 rather than tearing down the connection thread.

use super::protocol::{Reply, Request, Response, RpcError};
use serde_json::Value;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, PoisonError, RwLock};

/// A method implementation: parameters in, result or error out.
pub type Handler = Box<dyn Fn(Option<Value>) -> Result<Value, RpcError> + Send + Sync>;

/// The built-in method listing all registered methods.
pub const GET_METHODS: &str = "rpc_get_methods";

/// Why a method could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// A method of that name is already registered (or is built in).
    #[error("RPC method `{0}` is already registered")]
    Duplicate(String),
    /// The name is not of the form `[a-z0-9_]+` (SPDK's `<subsystem>_<object>_<verb>`).
    #[error("invalid RPC method name `{0}`: use lowercase letters, digits and `_`")]
    InvalidName(String),
}

/// Name-to-handler table with dispatch. Share it as `Arc<MethodRegistry>`.
#[derive(Default)]
pub struct MethodRegistry {
    methods: RwLock<BTreeMap<String, Arc<Handler>>>,
}

impl std::fmt::Debug for MethodRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MethodRegistry")
            .field("methods", &self.method_names())
            .finish()
    }
}

impl MethodRegistry {
    /// An empty registry (apart from the built-in `rpc_get_methods`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `name`.
    pub fn register<F>(&self, name: &str, handler: F) -> Result<(), RegisterError>
    where
        F: Fn(Option<Value>) -> Result<Value, RpcError> + Send + Sync + 'static,
    {
        self.register_boxed(name, Box::new(handler))
    }

    /// Registers an already boxed handler.
    pub fn register_boxed(&self, name: &str, handler: Handler) -> Result<(), RegisterError> {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(RegisterError::InvalidName(name.to_owned()));
        }
        if name == GET_METHODS {
            return Err(RegisterError::Duplicate(name.to_owned()));
        }
        let mut methods = self.methods.write().unwrap_or_else(PoisonError::into_inner);
        if methods.contains_key(name) {
            return Err(RegisterError::Duplicate(name.to_owned()));
        }
        methods.insert(name.to_owned(), Arc::new(handler));
        Ok(())
    }

    /// Whether `name` can be called (built-ins included).
    pub fn contains(&self, name: &str) -> bool {
        name == GET_METHODS
            || self
                .methods
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(name)
    }

    /// All callable method names, sorted (built-ins included).
    pub fn method_names(&self) -> Vec<String> {
        let methods = self.methods.read().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = methods.keys().cloned().collect();
        names.push(GET_METHODS.to_owned());
        names.sort();
        names
    }

    /// Calls the method a request names. Returns `None` for notifications,
    /// whose outcome (even an error) is never sent back.
    pub fn dispatch(&self, request: Request) -> Option<Response> {
        let Request { method, params, id } = request;
        let outcome = self.call(&method, params);
        if let Err(e) = &outcome {
            tracing::debug!(method = %method, code = e.code, message = %e.message, "RPC failed");
        }
        id.map(|id| Response { id, outcome })
    }

    /// Calls `method` directly, as `dispatch` does, without a request object.
    pub fn call(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        if method == GET_METHODS {
            return self.get_methods(params);
        }
        let handler = self
            .methods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(method)
            .cloned();
        let Some(handler) = handler else {
            return Err(RpcError::method_not_found(method));
        };
        match catch_unwind(AssertUnwindSafe(|| handler(params))) {
            Ok(outcome) => outcome,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                tracing::error!(method = %method, panic = %what, "RPC handler panicked");
                Err(RpcError::internal(format!(
                    "handler for `{method}` panicked"
                )))
            }
        }
    }

    /// Handles one incoming JSON value: a request, a notification or a
    /// batch. Returns what to send back, if anything.
    pub fn handle_value(&self, value: Value) -> Option<Reply> {
        match value {
            Value::Array(items) => {
                if items.is_empty() {
                    return Some(Reply::Single(Response::error(
                        super::protocol::Id::Null,
                        RpcError::invalid_request("empty batch"),
                    )));
                }
                let responses: Vec<Response> = items
                    .into_iter()
                    .filter_map(|item| self.handle_single(item))
                    .collect();
                if responses.is_empty() {
                    None
                } else {
                    Some(Reply::Batch(responses))
                }
            }
            other => self.handle_single(other).map(Reply::Single),
        }
    }

    /// Handles one would-be request (a batch member or a lone value).
    fn handle_single(&self, value: Value) -> Option<Response> {
        match Request::from_value(value) {
            Ok(request) => self.dispatch(request),
            Err(invalid) => Some(invalid.into_response()),
        }
    }

    /// `rpc_get_methods`: takes no params (or `{}` / `[]`), returns the
    /// sorted method list.
    fn get_methods(&self, params: Option<Value>) -> Result<Value, RpcError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NoParams {}
        let NoParams {} = super::protocol::parse_params(params)?;
        Ok(Value::from(self.method_names()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::protocol::Id;
    use proptest::prelude::*;
    use serde_json::json;

    fn registry() -> MethodRegistry {
        let r = MethodRegistry::new();
        r.register("test_echo", |p| Ok(p.unwrap_or(Value::Null)))
            .unwrap();
        r.register("test_fail", |_| Err(RpcError::errno(libc::EEXIST)))
            .unwrap();
        r.register("test_panic", |_| panic!("boom")).unwrap();
        r
    }

    fn call(r: &MethodRegistry, v: Value) -> Option<Value> {
        r.handle_value(v)
            .map(|reply| serde_json::to_value(reply).unwrap())
    }

    #[test]
    fn dispatch_ok_and_error() {
        let r = registry();
        assert_eq!(
            call(
                &r,
                json!({"jsonrpc":"2.0","method":"test_echo","params":[1],"id":1})
            ),
            Some(json!({"jsonrpc":"2.0","id":1,"result":[1]}))
        );
        assert_eq!(
            call(&r, json!({"jsonrpc":"2.0","method":"test_fail","id":"a"})),
            Some(json!({"jsonrpc":"2.0","id":"a","error":{"code":-17,"message":"File exists"}}))
        );
        let v = call(&r, json!({"jsonrpc":"2.0","method":"nope_x","id":2})).unwrap();
        assert_eq!(v["error"]["code"], json!(-32601));
        assert!(v["error"]["message"].as_str().unwrap().contains("nope_x"));
    }

    #[test]
    fn handler_panic_is_internal_error() {
        let r = registry();
        let v = call(&r, json!({"jsonrpc":"2.0","method":"test_panic","id":1})).unwrap();
        assert_eq!(v["error"]["code"], json!(-32603));
        // The registry still works afterwards.
        assert!(r.call("test_echo", None).is_ok());
    }

    #[test]
    fn notifications_get_no_reply() {
        let r = registry();
        assert_eq!(
            call(&r, json!({"jsonrpc":"2.0","method":"test_echo"})),
            None
        );
        // Not even errors.
        assert_eq!(call(&r, json!({"jsonrpc":"2.0","method":"nope"})), None);
        assert_eq!(
            call(&r, json!({"jsonrpc":"2.0","method":"test_fail"})),
            None
        );
    }

    #[test]
    fn batches() {
        let r = registry();
        assert_eq!(
            call(&r, json!([])),
            Some(
                json!({"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"invalid request: empty batch"}})
            )
        );
        let v = call(
            &r,
            json!([
                {"jsonrpc":"2.0","method":"test_echo","params":{"a":1},"id":1},
                {"jsonrpc":"2.0","method":"test_echo"},
                1,
                {"jsonrpc":"2.0","method":"nope","id":"x"},
                [],
            ]),
        )
        .unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 4);
        assert_eq!(arr[0]["result"], json!({"a":1}));
        assert_eq!(arr[1]["error"]["code"], json!(-32600));
        assert_eq!(arr[2]["id"], json!("x"));
        assert_eq!(arr[2]["error"]["code"], json!(-32601));
        assert_eq!(arr[3]["error"]["code"], json!(-32600));
        // All notifications: nothing at all.
        assert_eq!(
            call(
                &r,
                json!([{"jsonrpc":"2.0","method":"test_echo"},{"jsonrpc":"2.0","method":"x"}])
            ),
            None
        );
        // Invalid members of a batch are answered one each.
        let v = call(&r, json!([1, 2, 3])).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 3);
    }

    #[test]
    fn get_methods_sorted() {
        let r = registry();
        r.register("bdev_malloc_create", |_| Ok(Value::Null))
            .unwrap();
        assert_eq!(
            r.call(GET_METHODS, None).unwrap(),
            json!([
                "bdev_malloc_create",
                "rpc_get_methods",
                "test_echo",
                "test_fail",
                "test_panic"
            ])
        );
        assert!(r.call(GET_METHODS, Some(json!({}))).is_ok());
        assert!(r.call(GET_METHODS, Some(json!([]))).is_ok());
        let e = r.call(GET_METHODS, Some(json!({"x":1}))).unwrap_err();
        assert_eq!(e.code, RpcError::INVALID_PARAMS);
    }

    #[test]
    fn register_rejects_duplicates_and_bad_names() {
        let r = registry();
        assert_eq!(
            r.register("test_echo", |_| Ok(Value::Null)),
            Err(RegisterError::Duplicate("test_echo".into()))
        );
        assert!(matches!(
            r.register(GET_METHODS, |_| Ok(Value::Null)),
            Err(RegisterError::Duplicate(_))
        ));
        for bad in ["", "Bdev", "rpc.x", "a b", "bdev-x"] {
            assert!(matches!(
                r.register(bad, |_| Ok(Value::Null)),
                Err(RegisterError::InvalidName(_))
            ));
        }
    }

    #[test]
    fn handler_may_register_methods() {
        let r = Arc::new(MethodRegistry::new());
        let weak = Arc::downgrade(&r);
        r.register("test_add", move |_| {
            let r = weak.upgrade().ok_or_else(|| RpcError::internal("gone"))?;
            r.register("test_added", |_| Ok(json!(true)))
                .map_err(|e| RpcError::app(-17, e.to_string()))?;
            Ok(Value::Null)
        })
        .unwrap();
        r.call("test_add", None).unwrap();
        assert_eq!(r.call("test_added", None).unwrap(), json!(true));
        assert!(r.contains("test_added"));
        let resp = r
            .dispatch(Request::new("test_add", None, Id::from(1u64)))
            .unwrap();
        assert_eq!(resp.outcome.unwrap_err().code, -17);
    }

    /// Arbitrary JSON values, biased towards request-shaped objects.
    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z_.]{0,12}".prop_map(Value::from),
            Just(Value::from("2.0")),
            Just(Value::from("test_echo")),
            Just(Value::from(GET_METHODS)),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("jsonrpc".to_owned()),
                        Just("method".to_owned()),
                        Just("params".to_owned()),
                        Just("id".to_owned()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics(v in arb_json()) {
            let r = registry();
            let is_batch = matches!(&v, Value::Array(a) if !a.is_empty());
            if let Some(reply) = r.handle_value(v) {
                let out = serde_json::to_value(&reply).unwrap();
                prop_assert!(out.is_object() || (is_batch && out.is_array()));
            }
        }

        #[test]
        fn request_shaped_values_never_panic(
            version in arb_json(), method in arb_json(), params in arb_json(), id in arb_json()
        ) {
            let r = registry();
            let mut obj = serde_json::Map::new();
            obj.insert("jsonrpc".into(), version);
            obj.insert("method".into(), method);
            obj.insert("params".into(), params);
            obj.insert("id".into(), id);
            let reply = r.handle_value(Value::Object(obj));
            // An id is present, so there is always a reply.
            prop_assert!(reply.is_some());
        }
    }
}
