//! Synchronous site-to-site mirroring.
//!
//! Every write accepted by a mirrored volume is sent to the remote legs before
//! it is acknowledged (DRBD-like, after US 7,464,239: domain mirror agents, a
//! master agent that allocates virtual mirror devices from extents on storage
//! servers, consistency checks by range digests, splits at an epoch).
//!
//! Only the wire protocol lives here so far: [`wire`] is a sans-IO codec and
//! handshake that the socket layer, the mirror engine and the agents build on.

pub mod wire;
