//! Synchronous site-to-site mirroring.
//!
//! Every write accepted by a mirrored volume is sent to the remote legs before
//! it is acknowledged (DRBD-like, after US 7,464,239: domain mirror agents, a
//! master agent that allocates virtual mirror devices from extents on storage
//! servers, consistency checks by range digests, splits at an epoch).
//!
//! - [`wire`]: the sans-IO codec and handshake;
//! - [`sequencer`]: sequence number + split epoch from one atomic word;
//! - [`overlap`]: serialises overlapping writes across cores;
//! - [`meta`]: dirty bitmaps, activity log, generations, on disk;
//! - [`link`]: frames and handshakes over reactor sockets;
//! - [`sendq`]: a link's send queue (many frames per `sendmsg`);
//! - [`replies`]: a link's reply slots (where requests wait for the leg);
//! - [`engine`]: the mirrored volume, its legs, resync;
//! - [`legset`]: the versioned leg slots (legs added and removed online);
//! - [`legops`]: `mirror_add_leg`, `mirror_remove_leg`, auto-replacement;
//! - [`service`]: the site's listener, the remote leg targets, the agents;
//! - [`verify`]: online consistency check by range digests, and repair;
//! - [`split`]: split mirror (point-in-time images), rejoin, promote;
//! - [`group`]: consistency groups (mirrors sharing one sequencer).

pub mod engine;
pub mod group;
pub mod legops;
pub mod legset;
pub mod link;
pub mod meta;
pub mod overlap;
pub(crate) mod replies;
pub(crate) mod sendq;
pub mod sequencer;
pub mod service;
pub mod split;
pub mod verify;
pub mod wire;
