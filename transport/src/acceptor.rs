//! Moving connections between cores, and an accept loop that spreads them.
//!
//! A connection should live on one core for its whole life (its tasks use
//! `Rc`, its ops complete on that core's ring), but one listener accepts on
//! one reactor. [`hand_off`] moves an accepted stream to a chosen reactor: on
//! the accepting core the stream becomes a plain std socket (a descriptor,
//! which is `Send`), travels in a closure through the target reactor's inbox
//! ([`ReactorHandle::post`]), and is wrapped again there, where the
//! connection's task is spawned. Nothing about the socket is tied to a ring
//! (no fixed-file slot), so the move costs one inbox message.
//!
//! [`Acceptor`] is the usual loop on top: accept, pick the next reactor
//! round-robin, hand off, run the user's per-connection async fn there.

use mirrorpoint_poller::{sleep, spawn, ReactorHandle};
use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::listener::TcpListener;
use crate::stream::TcpStream;

/// Why a stream could not be handed to another reactor.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// An abandoned op on this reactor still holds the socket; here it is back.
    #[error("the stream still has operations in flight on this reactor")]
    Busy(TcpStream),
    /// The target reactor has stopped; the connection was closed.
    #[error("the target reactor has stopped; the connection was closed")]
    Stopped,
}

/// Moves `stream` to the reactor behind `target` and runs `run(stream)` there
/// as a detached task. Callable from any reactor (including the target).
pub fn hand_off<F, Fut>(
    stream: TcpStream,
    target: &ReactorHandle,
    run: F,
) -> Result<(), HandoffError>
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let std_stream = stream.into_std().map_err(HandoffError::Busy)?;
    let posted = target.post(move || match TcpStream::from_std(std_stream) {
        Ok(stream) => spawn(run(stream)).detach(),
        Err(e) => tracing::warn!("cannot adopt a handed-over connection: {e}"),
    });
    // When the post fails, the closure (and the socket in it) was dropped.
    if posted {
        Ok(())
    } else {
        Err(HandoffError::Stopped)
    }
}

/// Accepts on the current reactor and runs each connection on one of a set
/// of reactors, round-robin.
pub struct Acceptor {
    listener: TcpListener,
    targets: Vec<ReactorHandle>,
    next: Cell<usize>,
}

impl Acceptor {
    /// An acceptor spreading connections over `targets` (which may include
    /// the reactor it runs on). `targets` must not be empty.
    pub fn new(listener: TcpListener, targets: Vec<ReactorHandle>) -> io::Result<Acceptor> {
        if targets.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an acceptor needs at least one target reactor",
            ));
        }
        Ok(Acceptor {
            listener,
            targets,
            next: Cell::new(0),
        })
    }

    /// The listener's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until a fatal error (or until this future is dropped, or the
    /// runtime shuts down, which cancels the pending accept). For each
    /// connection, `handler(stream, peer)` is called and awaited on the next
    /// target reactor. Per-connection accept failures (`ECONNABORTED`,
    /// descriptor or memory exhaustion, network errors the kernel passes on)
    /// are logged and skipped, with a short pause when resources ran out.
    pub async fn run<F, Fut>(&self, handler: F) -> io::Result<()>
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let handler = Arc::new(handler);
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => self.dispatch(stream, peer, &handler),
                Err(e) => match classify(&e) {
                    AcceptError::Skip => {
                        tracing::debug!("accept: {e} (skipped)");
                    }
                    AcceptError::Backoff => {
                        tracing::warn!("accept: {e}; pausing");
                        sleep(Duration::from_millis(10)).await;
                    }
                    AcceptError::Fatal => return Err(e),
                },
            }
        }
    }

    fn dispatch<F, Fut>(&self, stream: TcpStream, peer: SocketAddr, handler: &Arc<F>)
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let i = self.next.get() % self.targets.len();
        self.next.set(i + 1);
        let handler = handler.clone();
        let run = move |s: TcpStream| handler(s, peer);
        match hand_off(stream, &self.targets[i], run) {
            Ok(()) => {}
            Err(HandoffError::Stopped) => {
                tracing::warn!(%peer, "target reactor stopped; connection closed");
            }
            // Cannot happen for a fresh stream (no op has touched it); the
            // stream is dropped, closing the connection.
            Err(HandoffError::Busy(_)) => {}
        }
    }
}

enum AcceptError {
    Skip,
    Backoff,
    Fatal,
}

fn classify(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        // The connection went away, or Linux passes on a network error
        // (accept(2), "Error handling").
        Some(
            libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT,
        ) => AcceptError::Skip,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Backoff,
        _ => AcceptError::Fatal,
    }
}
