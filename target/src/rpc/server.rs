//! The JSON-RPC server on a Unix stream socket (the admin plane).
//!
//! This is control-plane code, so it uses blocking std I/O on its own threads
//! rather than the data-path pollers: one accept thread plus one thread per
//! connection, with a cap on concurrent connections. A slow, silent or
//! garbage-sending client only ever ties up its own thread.
//!
//! The socket is created by hand with `socket`/`bind`, chmod'ed to 0600 and
//! only then put in `listen`, so there is no moment at which another user can
//! connect through a more permissive mode (before `listen`, `connect` is
//! refused). A socket file already at the path is removed only if it is a
//! socket and nobody answers on it; anything else is left alone.
//!
//! Framing follows SPDK: the client writes JSON values back to back, with or
//! without whitespace between them, and the server parses them incrementally
//! and answers each with one line of compact JSON. After malformed JSON the
//! stream cannot be resynchronised, so the server answers -32700 and closes
//! the connection; a well-formed value that is not a request gets -32600 and
//! the connection carries on. A single value may not exceed
//! [`MAX_REQUEST_BYTES`] (by default), which bounds what a client can make us
//! buffer.
//!
//! Shutdown wakes the accept thread through a socketpair (its `poll` waits on
//! the listener and the wake end), which then shuts down every open
//! connection, joins the connection threads, closes the listener and unlinks
//! the socket file if it is still the one it created.

use super::protocol::{Id, Reply, Response, RpcError};
use super::registry::MethodRegistry;
use serde_json::Value;
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/var/tmp/mirrorpoint.sock";
/// Default cap on concurrently served connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default cap on the size of a single JSON value (request or batch).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// Default time a response write may block on a client that does not read.
const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pending-connection queue length passed to `listen`.
const LISTEN_BACKLOG: libc::c_int = 128;
/// Pause after an `accept`/`poll` failure such as EMFILE, to avoid spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Socket path.
    pub path: PathBuf,
    /// Connections served at once; more are answered with an error and closed.
    pub max_connections: usize,
    /// Largest single JSON value accepted, in bytes.
    pub max_request_bytes: usize,
    /// Close a connection that sends nothing for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Close a connection whose response write blocks this long (`None`: never).
    pub write_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            path: PathBuf::from(DEFAULT_SOCKET_PATH),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_request_bytes: MAX_REQUEST_BYTES,
            idle_timeout: None,
            write_timeout: Some(DEFAULT_WRITE_TIMEOUT),
        }
    }
}

impl ServerConfig {
    /// Defaults, listening at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ServerConfig {
            path: path.into(),
            ..Self::default()
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The path is empty, too long for `sockaddr_un` or contains NUL.
    #[error("invalid socket path {0:?}: empty, too long or containing NUL")]
    InvalidPath(PathBuf),
    /// A configuration value is out of range.
    #[error("invalid RPC server configuration: {0}")]
    InvalidConfig(&'static str),
    /// Another server answers on the path.
    #[error("an RPC server is already listening on {0:?}")]
    AlreadyRunning(PathBuf),
    /// Something that is not a socket is in the way; it is not removed.
    #[error("{0:?} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// State shared by the server handle, the accept thread and connections.
struct Shared {
    registry: Arc<MethodRegistry>,
    config: ServerConfig,
    stopping: AtomicBool,
    /// Write end of the wake-up socketpair; the accept thread polls the other.
    waker: UnixStream,
    /// Open connections (a clone of each stream, to shut it down from outside).
    conns: Mutex<HashMap<u64, UnixStream>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, UnixStream>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn request_stop(&self) {
        if !self.stopping.swap(true, Ordering::AcqRel) {
            tracing::info!(path = ?self.config.path, "RPC server shutting down");
        }
        // A full buffer means a wake-up is already pending; nothing else can fail
        // usefully here, so errors are ignored.
        let _ = (&self.waker).write(&[1]);
    }
}

/// Triggers shutdown of a running [`RpcServer`] without waiting for it, e.g.
/// from an RPC handler (which must not wait: the server joins its thread).
///
/// It holds the server weakly: a handler stored in the registry may keep one
/// without creating a reference cycle, and once the server is gone the
/// handle does nothing.
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Weak<Shared>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("alive", &(self.shared.strong_count() > 0))
            .finish()
    }
}

impl ShutdownHandle {
    /// Asks the server to stop; returns at once.
    pub fn shutdown(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.request_stop();
        }
    }

    /// Whether shutdown has been requested (or the server is gone).
    pub fn is_shutting_down(&self) -> bool {
        match self.shared.upgrade() {
            Some(shared) => shared.stopping.load(Ordering::Acquire),
            None => true,
        }
    }
}

/// A running JSON-RPC server. Dropping it shuts it down and waits.
pub struct RpcServer {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("path", &self.shared.config.path)
            .finish()
    }
}

impl RpcServer {
    /// Binds the socket (mode 0600) and starts serving `registry` on it.
    pub fn start(config: ServerConfig, registry: Arc<MethodRegistry>) -> Result<Self, ServerError> {
        if config.max_connections == 0 {
            return Err(ServerError::InvalidConfig(
                "max_connections must be at least 1",
            ));
        }
        if config.max_request_bytes == 0 {
            return Err(ServerError::InvalidConfig(
                "max_request_bytes must be at least 1",
            ));
        }
        let path = config.path.clone();
        let io_err = |op: &'static str| {
            let path = path.clone();
            move |source: io::Error| ServerError::Io { op, path, source }
        };
        remove_stale_socket(&path)?;
        let listener = bind_socket(&path)?;
        // Identify the file we created, so we never unlink someone else's.
        let ident = std::fs::symlink_metadata(&path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(io_err("stat"));
        let ident = match ident {
            Ok(ident) => ident,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let setup = || -> Result<(Arc<Shared>, UnixStream), ServerError> {
            listener
                .set_nonblocking(true)
                .map_err(io_err("set_nonblocking"))?;
            let (waker, wake_rx) = UnixStream::pair().map_err(io_err("socketpair for"))?;
            waker
                .set_nonblocking(true)
                .map_err(io_err("set_nonblocking"))?;
            wake_rx
                .set_nonblocking(true)
                .map_err(io_err("set_nonblocking"))?;
            let shared = Arc::new(Shared {
                registry,
                config: config.clone(),
                stopping: AtomicBool::new(false),
                waker,
                conns: Mutex::new(HashMap::new()),
            });
            Ok((shared, wake_rx))
        };
        let (shared, wake_rx) = match setup() {
            Ok(v) => v,
            Err(e) => {
                remove_if_ours(&path, ident);
                return Err(e);
            }
        };
        let accept_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("rpc-accept".to_owned())
            .spawn(move || accept_loop(accept_shared, listener, wake_rx, ident));
        let accept = match spawned {
            Ok(handle) => handle,
            Err(e) => {
                remove_if_ours(&path, ident);
                return Err(io_err("spawn accept thread for")(e));
            }
        };
        tracing::info!(path = ?path, "RPC server listening");
        Ok(RpcServer {
            shared,
            accept: Some(accept),
        })
    }

    /// Starts a server at `path` with default settings.
    pub fn bind(
        path: impl Into<PathBuf>,
        registry: Arc<MethodRegistry>,
    ) -> Result<Self, ServerError> {
        Self::start(ServerConfig::new(path), registry)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.shared.config.path
    }

    /// The registry being served.
    pub fn registry(&self) -> &Arc<MethodRegistry> {
        &self.shared.registry
    }

    /// Connections currently being served.
    pub fn active_connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// A handle that can trigger shutdown from elsewhere (e.g. a handler).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Stops accepting, closes all connections, waits for every server
    /// thread and removes the socket file. A handler that is running at the
    /// time is waited for (its reply is dropped), so this must not be called
    /// from an RPC handler: use [`ShutdownHandle`] there.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Waits until the server has been shut down through a [`ShutdownHandle`]
    /// and its threads have finished.
    pub fn join(mut self) {
        self.wait();
    }

    fn stop(&mut self) {
        self.shared.request_stop();
        self.wait();
    }

    fn wait(&mut self) {
        if let Some(handle) = self.accept.take() {
            if handle.join().is_err() {
                tracing::error!("RPC accept thread panicked");
            }
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes a leftover socket file at `path`, unless a server answers there
/// or it is not a socket.
fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Io {
                op: "stat",
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::AlreadyRunning(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = ?path, "removing stale RPC socket");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ServerError::Io {
                    op: "remove stale socket",
                    path: path.to_owned(),
                    source,
                }),
            }
        }
        Err(source) => Err(ServerError::Io {
            op: "probe existing socket",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates the listening socket: `socket`, `bind`, chmod 0600, `listen`.
fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let io_err = |op: &'static str| {
        let path = path.to_owned();
        move |source: io::Error| ServerError::Io { op, path, source }
    };
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data (an integer and a byte array), for
    // which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // Leave room for the terminating NUL, which the zeroing provides.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(ServerError::InvalidPath(path.to_owned()));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let addr_len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let addr_len = libc::socklen_t::try_from(addr_len)
        .map_err(|_| ServerError::InvalidPath(path.to_owned()))?;

    // SAFETY: socket() takes no pointers; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io_err("create socket for")(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor from socket() that nothing else owns;
    // OwnedFd closes it on every early return below.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // SAFETY: `addr` is an initialised sockaddr_un living across the call and
    // `addr_len` does not exceed its size; bind() only reads it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            addr_len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::AddrInUse {
            ServerError::AlreadyRunning(path.to_owned())
        } else {
            io_err("bind")(e)
        });
    }
    // Not listening yet, so nobody can connect while the mode is still the
    // umask-derived one.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(io_err("chmod")(e));
    }
    // SAFETY: `fd` is a valid, bound socket descriptor; listen() takes no pointers.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(io_err("listen on")(e));
    }
    Ok(UnixListener::from(fd))
}

/// Unlinks `path` if it is still the socket file we created.
fn remove_if_ours(path: &Path, ident: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == ident => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = ?path, error = %e, "could not remove RPC socket");
            }
        }
        Ok(_) => tracing::warn!(path = ?path, "RPC socket was replaced; leaving it"),
        Err(_) => {}
    }
}

/// Blocks until `a` or `b` is readable (or an error/hangup is pending).
fn wait_readable(a: RawFd, b: RawFd) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd structs that outlives the
    // call, and the count passed matches its length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn accept_loop(
    shared: Arc<Shared>,
    listener: UnixListener,
    wake_rx: UnixStream,
    ident: (u64, u64),
) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id: u64 = 0;
    while !shared.stopping.load(Ordering::Acquire) {
        if let Err(e) = wait_readable(listener.as_raw_fd(), wake_rx.as_raw_fd()) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "RPC poll failed");
                std::thread::sleep(ACCEPT_ERROR_BACKOFF);
            }
            continue;
        }
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %e, "RPC accept failed");
                std::thread::sleep(ACCEPT_ERROR_BACKOFF);
                continue;
            }
        };
        // Reap finished connection threads.
        let (done, running): (Vec<_>, Vec<_>) =
            workers.into_iter().partition(JoinHandle::is_finished);
        workers = running;
        for handle in done {
            let _ = handle.join();
        }
        if let Some(handle) = admit(&shared, stream, next_id) {
            workers.push(handle);
        }
        next_id = next_id.wrapping_add(1);
    }

    // Shutting down: close the listener first so no new client queues up,
    // then end every connection and wait for its thread.
    drop(listener);
    for stream in shared.conns().values() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    for handle in workers {
        if handle.join().is_err() {
            tracing::error!("RPC connection thread panicked");
        }
    }
    remove_if_ours(&shared.config.path, ident);
    tracing::info!(path = ?shared.config.path, "RPC server stopped");
}

/// Starts a thread for a new connection, or turns it away if at the limit.
fn admit(shared: &Arc<Shared>, stream: UnixStream, id: u64) -> Option<JoinHandle<()>> {
    if let Err(e) = stream.set_nonblocking(false) {
        tracing::warn!(error = %e, "RPC connection setup failed");
        return None;
    }
    let limit = shared.config.max_connections;
    {
        let mut conns = shared.conns();
        if conns.len() >= limit {
            drop(conns);
            tracing::warn!(limit, "RPC connection limit reached; rejecting client");
            reject(&stream, limit);
            return None;
        }
        match stream.try_clone() {
            Ok(clone) => {
                conns.insert(id, clone);
            }
            Err(e) => {
                tracing::warn!(error = %e, "RPC connection setup failed");
                return None;
            }
        }
    }
    let thread_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("rpc-conn-{id}"))
        .spawn(move || run_connection(&thread_shared, id, stream));
    match spawned {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "could not start RPC connection thread");
            if let Some(s) = shared.conns().remove(&id) {
                let _ = s.shutdown(Shutdown::Both);
            }
            None
        }
    }
}

/// Tells a client over the connection limit why, without ever blocking.
fn reject(stream: &UnixStream, limit: usize) {
    let reply = Reply::Single(Response::error(
        Id::Null,
        RpcError::internal(format!("too many connections (limit {limit})")),
    ));
    let _ = stream.set_nonblocking(true);
    let _ = (&*stream).write_all(&reply.to_line());
    let _ = stream.shutdown(Shutdown::Both);
}

/// Serves one connection until EOF, a fatal error or shutdown.
fn run_connection(shared: &Shared, id: u64, stream: UnixStream) {
    /// Closes the connection and forgets it, however the thread ends.
    struct Guard<'a> {
        shared: &'a Shared,
        id: u64,
        stream: &'a UnixStream,
    }
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let _ = self.stream.shutdown(Shutdown::Both);
            self.shared.conns().remove(&self.id);
        }
    }
    let _guard = Guard {
        shared,
        id,
        stream: &stream,
    };
    if shared.stopping.load(Ordering::Acquire) {
        return;
    }
    let config = &shared.config;
    if let Err(e) = stream
        .set_read_timeout(config.idle_timeout)
        .and_then(|()| stream.set_write_timeout(config.write_timeout))
    {
        tracing::warn!(conn = id, error = %e, "RPC connection setup failed");
        return;
    }
    tracing::debug!(conn = id, "RPC connection opened");
    let end = serve_stream(
        &shared.registry,
        BufReader::new(&stream),
        &mut &stream,
        config.max_request_bytes,
    );
    match end {
        StreamEnd::Io(e) => tracing::debug!(conn = id, error = %e, "RPC connection closed"),
        other => tracing::debug!(conn = id, end = ?other, "RPC connection closed"),
    }
}

/// Why [`serve_stream`] stopped.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    /// The client closed the stream between values.
    Eof,
    /// Malformed JSON (or EOF inside a value); -32700 was sent.
    Malformed,
    /// A value exceeded the size cap; an error was sent.
    TooLarge,
    /// Reading or writing failed (including timeouts and shutdown).
    Io(io::Error),
}

/// A reader that fails once more than the remaining budget has been read.
/// The budget is reset by [`serve_stream`] after every complete value.
struct Limited<R> {
    inner: R,
    remaining: Rc<Cell<usize>>,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.remaining.get();
        if remaining == 0 {
            self.exceeded.set(true);
            return Err(io::Error::other("request too large"));
        }
        let want = buf.len().min(remaining);
        // `want <= buf.len()`, so this slice is always in bounds.
        let n = self.inner.read(&mut buf[..want])?;
        self.remaining.set(remaining.saturating_sub(n));
        Ok(n)
    }
}

/// Reads concatenated JSON values from `reader`, dispatches each and writes
/// each reply as one line to `writer`. Generic so the framing can be tested
/// (and fuzzed) without sockets.
pub(crate) fn serve_stream<R: Read, W: Write>(
    registry: &MethodRegistry,
    reader: R,
    writer: &mut W,
    max_request_bytes: usize,
) -> StreamEnd {
    let remaining = Rc::new(Cell::new(max_request_bytes));
    let exceeded = Rc::new(Cell::new(false));
    let limited = Limited {
        inner: reader,
        remaining: Rc::clone(&remaining),
        exceeded: Rc::clone(&exceeded),
    };
    let mut values = serde_json::Deserializer::from_reader(limited).into_iter::<Value>();
    loop {
        match values.next() {
            None => return StreamEnd::Eof,
            Some(Ok(value)) => {
                remaining.set(max_request_bytes);
                if let Some(reply) = registry.handle_value(value) {
                    if let Err(e) = write_line(writer, &reply) {
                        return StreamEnd::Io(e);
                    }
                }
            }
            Some(Err(e)) => {
                let (end, error) = if exceeded.get() {
                    (
                        StreamEnd::TooLarge,
                        RpcError::invalid_request(format!(
                            "request exceeds {max_request_bytes} bytes"
                        )),
                    )
                } else if e.is_io() {
                    let kind = e.io_error_kind().unwrap_or(io::ErrorKind::Other);
                    return StreamEnd::Io(io::Error::new(kind, e));
                } else {
                    (StreamEnd::Malformed, RpcError::parse_error(e))
                };
                tracing::debug!(error = %error.message, "RPC stream unusable; closing");
                let reply = Reply::Single(Response::error(Id::Null, error));
                // The connection is closed either way; a failed write changes nothing.
                let _ = write_line(writer, &reply);
                return end;
            }
        }
    }
}

fn write_line<W: Write>(writer: &mut W, reply: &Reply) -> io::Result<()> {
    writer.write_all(&reply.to_line())?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn registry() -> MethodRegistry {
        let r = MethodRegistry::new();
        r.register("test_echo", |p| Ok(p.unwrap_or(Value::Null)))
            .unwrap();
        r
    }

    fn run(input: &[u8], max: usize) -> (StreamEnd, Vec<Value>) {
        let mut out = Vec::new();
        let end = serve_stream(&registry(), input, &mut out, max);
        let text = String::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'));
        let lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (end, lines)
    }

    #[test]
    fn back_to_back_values_with_and_without_newlines() {
        let input = br#"{"jsonrpc":"2.0","method":"test_echo","params":[1],"id":1}{"jsonrpc":"2.0","method":"test_echo","params":[2],"id":2}
  {"jsonrpc":"2.0","method":"test_echo","params":[3],"id":3}"#;
        let (end, lines) = run(input, MAX_REQUEST_BYTES);
        assert!(matches!(end, StreamEnd::Eof), "{end:?}");
        let ids: Vec<_> = lines.iter().map(|l| l["id"].clone()).collect();
        assert_eq!(ids, vec![json!(1), json!(2), json!(3)]);
        assert_eq!(lines[2]["result"], json!([3]));
    }

    #[test]
    fn malformed_json_answers_and_stops() {
        let input = br#"{"jsonrpc":"2.0","method":"test_echo","id":1} {"jsonrpc": nope} {"jsonrpc":"2.0","method":"test_echo","id":2}"#;
        let (end, lines) = run(input, MAX_REQUEST_BYTES);
        assert!(matches!(end, StreamEnd::Malformed), "{end:?}");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["id"], json!(1));
        assert_eq!(lines[1]["error"]["code"], json!(-32700));
        assert_eq!(lines[1]["id"], json!(null));
    }

    #[test]
    fn truncated_value_at_eof_is_parse_error() {
        let (end, lines) = run(br#"{"jsonrpc":"2.0","meth"#, MAX_REQUEST_BYTES);
        assert!(matches!(end, StreamEnd::Malformed), "{end:?}");
        assert_eq!(lines[0]["error"]["code"], json!(-32700));
    }

    #[test]
    fn non_request_values_keep_the_stream_going() {
        let input = br#"1 "x" [] {"a":1} {"jsonrpc":"2.0","method":"test_echo","id":9}"#;
        let (end, lines) = run(input, MAX_REQUEST_BYTES);
        assert!(matches!(end, StreamEnd::Eof), "{end:?}");
        assert_eq!(lines.len(), 5);
        for l in &lines[..4] {
            assert_eq!(l["error"]["code"], json!(-32600));
        }
        assert_eq!(lines[4]["id"], json!(9));
    }

    #[test]
    fn oversized_value_is_rejected_but_the_cap_is_per_value() {
        let small = br#"{"jsonrpc":"2.0","method":"test_echo","id":1}"#;
        let mut input = Vec::new();
        for _ in 0..10 {
            input.extend_from_slice(small);
        }
        // Ten requests, each under the cap, together over it: all fine.
        let (end, lines) = run(&input, small.len() + 1);
        assert!(matches!(end, StreamEnd::Eof), "{end:?}");
        assert_eq!(lines.len(), 10);
        let big = format!(
            r#"{{"jsonrpc":"2.0","method":"test_echo","params":["{}"],"id":1}}"#,
            "a".repeat(1000)
        );
        let (end, lines) = run(big.as_bytes(), 100);
        assert!(matches!(end, StreamEnd::TooLarge), "{end:?}");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["error"]["code"], json!(-32600));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let input = "[".repeat(100_000);
        let (end, lines) = run(input.as_bytes(), MAX_REQUEST_BYTES);
        assert!(matches!(end, StreamEnd::Malformed), "{end:?}");
        assert_eq!(lines[0]["error"]["code"], json!(-32700));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            let _ = serve_stream(&registry(), &bytes[..], &mut out, 256);
            let text = String::from_utf8(out).unwrap();
            for line in text.lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                prop_assert!(v.is_object() || v.is_array());
            }
        }

        #[test]
        fn arbitrary_json_ish_text_never_panics(
            text in r#"[\[\]{}":,0-9a-z \n\\.-]{0,256}"#
        ) {
            let mut out = Vec::new();
            let _ = serve_stream(&registry(), text.as_bytes(), &mut out, 128);
        }
    }
}
