//! One exported logical unit: the shared state SPC-4 keeps per LU
//! (reservations, unit attentions, mode parameters) and the command
//! dispatcher.
//!
//! A `LogicalUnit` is shared by every session on every core, so its state
//! sits behind one mutex that is never held across an await. Each command
//! takes it once up front for the checks SAM-5 orders before execution
//! (pending unit attention, then reservation conflict) and to snapshot the
//! mode parameters; the data path then runs without it. Block-level
//! atomicity (COMPARE AND WRITE) uses the separate range lock.
//!
//! Unit attentions are queued per I_T nexus. A nexus the LU has never seen
//! starts with POWER ON OCCURRED (or I_T NEXUS LOSS OCCURRED if it was seen
//! and then lost); resets, reservation changes by another nexus and mode
//! parameter changes add theirs. Each is reported once, by the next command
//! other than INQUIRY, REPORT LUNS and REQUEST SENSE (which returns it as
//! its sense data and clears it).

use super::cdb::{op, Cdb};
use super::inquiry::{self, InquiryFacts};
use super::mode::{self, ModeState};
use super::pr::{Access, PrState, ProutParams, Spc2, UaTarget};
use super::rangelock::RangeLocks;
use super::sense::{Asc, Sense, SenseKey};
use super::task::{Nexus, ScsiResponse, ScsiTask};
use super::{good_with, opcodes, CmdResult, Fail};
use crate::volume::{Volume, VolumeChannel};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// How a logical unit presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunConfig {
    /// T10 vendor identification (8 ASCII characters, space padded).
    pub vendor: String,
    /// Product identification (16 characters).
    pub product: String,
    /// Product revision level (4 characters).
    pub revision: String,
    /// Unit serial number (VPD page 80h); empty derives it from the volume UUID.
    pub serial: String,
    /// NAA designator (8 bytes); `None` derives a locally assigned (3h) one
    /// from the volume UUID.
    pub naa_id: Option<u64>,
    /// Report logical block provisioning (UNMAP, WRITE SAME with UNMAP).
    pub thin_provisioning: bool,
    /// Report a volatile write cache (WCE=1): writes are durable only after
    /// SYNCHRONIZE CACHE or FUA. With `false` every write is flushed.
    pub write_cache: bool,
    /// Reject writes with DATA PROTECT / WRITE PROTECTED.
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

/// Upper bounds the handlers enforce and Block Limits reports.
pub(crate) const MAX_UNMAP_DESCRIPTORS: u32 = 256;
pub(crate) const MAX_UNMAP_LBA_COUNT: u32 = u32::MAX;
/// MAXIMUM WRITE SAME LENGTH in blocks. Kept below 65536 on purpose:
/// initiators (libiscsi among them) take a limit of 65536 or more as a
/// promise that a plain WRITE of that many blocks works too.
pub(crate) const MAX_WRITE_SAME_BLOCKS: u64 = 0xffff;
pub(crate) const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;
/// Nexuses remembered as lost (for I_T NEXUS LOSS OCCURRED), at most.
const MAX_LOST: usize = 4096;

type NexusKey = (String, String);

fn key(n: &Nexus) -> NexusKey {
    (n.initiator_port.clone(), n.target_port.clone())
}

fn is(k: &NexusKey, n: &Nexus) -> bool {
    k.0 == n.initiator_port && k.1 == n.target_port
}

#[derive(Debug, Default)]
struct NexusState {
    ua: VecDeque<Asc>,
    prevent: bool,
}

impl NexusState {
    fn push(&mut self, asc: Asc) {
        if !self.ua.contains(&asc) {
            self.ua.push_back(asc);
        }
    }
}

pub(crate) struct State {
    /// Per initiator port: (target port, state) of each nexus seen.
    nexuses: HashMap<String, Vec<(String, NexusState)>>,
    lost: VecDeque<NexusKey>,
    pub(crate) pr: PrState,
    pub(crate) spc2: Spc2,
    pub(crate) mode: ModeState,
    ports: BTreeSet<u16>,
    scratch: NexusState,
}

impl State {
    /// The state of `n`, created (with its first unit attention) when the
    /// LU sees it for the first time. The lookup allocates nothing: this
    /// runs for every command.
    fn nexus(&mut self, n: &Nexus) -> &mut NexusState {
        let known = self
            .nexuses
            .get(n.initiator_port.as_str())
            .is_some_and(|v| v.iter().any(|(t, _)| *t == n.target_port));
        if !known {
            self.ports.insert(n.relative_port);
            let was_lost = self.lost.iter().any(|l| is(l, n));
            let mut s = NexusState::default();
            s.push(if was_lost {
                Asc::I_T_NEXUS_LOSS_OCCURRED
            } else {
                Asc::POWER_ON_OCCURRED
            });
            self.nexuses
                .entry(n.initiator_port.clone())
                .or_default()
                .push((n.target_port.clone(), s));
        }
        let found = self
            .nexuses
            .get_mut(n.initiator_port.as_str())
            .and_then(|v| v.iter_mut().find(|(t, _)| *t == n.target_port));
        match found {
            Some((_, s)) => s,
            // Cannot happen (inserted above); a throw-away state keeps this total.
            None => {
                self.scratch = NexusState::default();
                &mut self.scratch
            }
        }
    }

    fn all_nexus_states(&mut self) -> impl Iterator<Item = (&str, &str, &mut NexusState)> {
        self.nexuses
            .iter_mut()
            .flat_map(|(i, v)| v.iter_mut().map(move |(t, s)| (i.as_str(), t.as_str(), s)))
    }

    fn ua_all(&mut self, asc: Asc, except: Option<&Nexus>) {
        for (i, t, s) in self.all_nexus_states() {
            if except.map_or(true, |n| n.initiator_port != i || n.target_port != t) {
                s.push(asc);
            }
        }
    }

    fn deliver(&mut self, uas: Vec<UaTarget>) {
        for u in uas {
            for (i, t, s) in self.all_nexus_states() {
                if i == u.initiator && u.target.as_deref().map_or(true, |x| x == t) {
                    s.push(u.asc);
                }
            }
        }
    }
}

/// An exported logical unit.
pub struct LogicalUnit {
    volume: Arc<Volume>,
    config: LunConfig,
    serial: String,
    naa: u64,
    default_mode: ModeState,
    state: Mutex<State>,
    pub(crate) locks: RangeLocks,
    pub(crate) lba_status: super::sbc::AllocationMap,
}

/// Commands that do not report (or clear) a pending unit attention.
fn ua_exempt(opcode: u8) -> bool {
    matches!(opcode, op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)
}

/// How a command accesses the LU, for the persistent reservation tables.
fn access(c: &Cdb<'_>) -> Access {
    match c.opcode() {
        op::INQUIRY
        | op::REPORT_LUNS
        | op::REQUEST_SENSE
        | op::TEST_UNIT_READY
        | op::READ_CAPACITY_10
        | op::MAINTENANCE_IN
        | op::PR_IN
        | op::PR_OUT => Access::Always,
        op::SERVICE_ACTION_IN_16 => match c.u8(1) & 0x1f {
            op::SAI_READ_CAPACITY_16 => Access::Always,
            _ => Access::Read,
        },
        op::PREVENT_ALLOW if c.u8(4) & 0x03 == 0 => Access::Always,
        op::START_STOP_UNIT if c.u8(4) & 0xf3 == 0x01 => Access::Always,
        op::READ_6
        | op::READ_10
        | op::READ_12
        | op::READ_16
        | op::VERIFY_10
        | op::VERIFY_12
        | op::VERIFY_16
        | op::PREFETCH_10
        | op::PREFETCH_16
        | op::MODE_SENSE_6
        | op::MODE_SENSE_10 => Access::Read,
        _ => Access::Write,
    }
}

/// Commands allowed through another nexus's SPC-2 reservation.
fn spc2_allowed(opcode: u8) -> bool {
    matches!(
        opcode,
        op::INQUIRY
            | op::REPORT_LUNS
            | op::REQUEST_SENSE
            | op::RELEASE_6
            | op::RELEASE_10
            | op::PR_IN
            | op::MAINTENANCE_IN
    )
}

/// What the dispatcher learned under the state lock.
#[derive(Clone, Copy)]
pub(crate) struct Snapshot {
    pub mode: ModeState,
}

impl LogicalUnit {
    /// A logical unit on `volume`.
    pub fn new(volume: Arc<Volume>, config: LunConfig) -> Self {
        let serial = if config.serial.is_empty() {
            volume
                .uuid()
                .chars()
                .filter(|c| c.is_ascii_hexdigit())
                .collect()
        } else {
            config.serial.clone()
        };
        let naa = config
            .naa_id
            .unwrap_or_else(|| inquiry::naa_from_uuid(volume.uuid()));
        let default_mode = ModeState {
            wce: config.write_cache,
            d_sense: false,
            swp: false,
        };
        let lba_status = super::sbc::AllocationMap::for_volume(&volume);
        LogicalUnit {
            volume,
            config,
            serial,
            naa,
            default_mode,
            state: Mutex::new(State {
                nexuses: HashMap::new(),
                lost: VecDeque::new(),
                pr: PrState::default(),
                spc2: Spc2::default(),
                mode: default_mode,
                ports: BTreeSet::new(),
                scratch: NexusState::default(),
            }),
            locks: RangeLocks::default(),
            lba_status,
        }
    }

    /// The volume behind it.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Its configuration.
    pub fn config(&self) -> &LunConfig {
        &self.config
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn num_blocks(&self) -> u64 {
        self.volume.num_blocks()
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.volume.block_size().bytes()
    }

    /// The largest transfer in blocks.
    pub(crate) fn max_transfer(&self) -> u32 {
        let chunk = mirrorpoint_poller::buffer_pool().chunk_size();
        super::max_transfer_blocks(self.block_size(), chunk)
    }

    /// One pool chunk in blocks.
    pub(crate) fn chunk_blocks(&self) -> u32 {
        let chunk = mirrorpoint_poller::buffer_pool().chunk_size();
        u32::try_from(chunk / self.block_size().max(1) as usize).unwrap_or(u32::MAX)
    }

    pub(crate) fn max_write_same_blocks(&self) -> u64 {
        MAX_WRITE_SAME_BLOCKS
    }

    /// Executes one command. `channel` must be a channel of [`Self::volume`]
    /// opened on the calling reactor. REPORT LUNS is target-level: the
    /// transport answers it with [`super::report_luns`].
    pub async fn execute(&self, channel: &VolumeChannel, task: ScsiTask<'_>) -> ScsiResponse {
        let c = Cdb::new(task.cdb);
        let snap = match self.admit(&c, task.nexus) {
            Ok(s) => s,
            Err((f, desc)) => return f.into_response(desc),
        };
        let desc = snap.mode.d_sense;
        match self.dispatch(channel, &c, &task, snap).await {
            Ok(r) => r,
            Err(f) => f.into_response(desc),
        }
    }

    /// Unit attention and reservation checks (SAM-5 §5.14 order).
    fn admit(&self, c: &Cdb<'_>, n: &Nexus) -> Result<Snapshot, (Fail, bool)> {
        let mut st = self.state();
        let desc = st.mode.d_sense;
        let opcode = c.opcode();
        if task_has_cdb(c) && !ua_exempt(opcode) {
            if let Some(asc) = st.nexus(n).ua.pop_front() {
                return Err((Sense::new(SenseKey::UnitAttention, asc).into(), desc));
            }
        } else {
            st.nexus(n);
        }
        if st.spc2.blocks(n) && !spc2_allowed(opcode) {
            return Err((Fail::Conflict, desc));
        }
        let pr_checked = !matches!(
            opcode,
            op::RESERVE_6 | op::RESERVE_10 | op::RELEASE_6 | op::RELEASE_10
        );
        if pr_checked && st.pr.conflicts(n, access(c)) {
            return Err((Fail::Conflict, desc));
        }
        Ok(Snapshot { mode: st.mode })
    }

    async fn dispatch(
        &self,
        ch: &VolumeChannel,
        c: &Cdb<'_>,
        task: &ScsiTask<'_>,
        snap: Snapshot,
    ) -> CmdResult {
        let opcode = c.opcode();
        if let Some(len) = super::cdb::group_len(opcode) {
            if c.0.len() < len {
                return Err(Sense::invalid_field_in_cdb(0, None).into());
            }
        }
        match opcode {
            op::TEST_UNIT_READY => {
                c.check_len(6)?;
                Ok(ScsiResponse::good())
            }
            op::REQUEST_SENSE => self.request_sense(c, task),
            op::INQUIRY => {
                let d = inquiry::inquiry(c, &self.facts(), task.nexus)?;
                good_with(&d, usize::from(c.be16(3)), task)
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
                let ten = opcode == op::MODE_SENSE_10;
                c.check_len(if ten { 10 } else { 6 })?;
                let d = mode::sense_data(
                    c,
                    &snap.mode,
                    &self.default_mode,
                    self.config.read_only,
                    self.num_blocks(),
                    self.block_size(),
                )?;
                let alloc = if ten {
                    usize::from(c.be16(7))
                } else {
                    usize::from(c.u8(4))
                };
                good_with(&d, alloc, task)
            }
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => self.mode_select(c, task),
            op::RESERVE_6 | op::RESERVE_10 => {
                c.check_len(if opcode == op::RESERVE_6 { 6 } else { 10 })?;
                if opcode == op::RESERVE_10 && c.u8(1) & 0x12 != 0 {
                    // 3RDPTY / LONGID: third-party reservations are not supported.
                    return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
                }
                let mut st = self.state();
                if st.pr.reservation.is_some() {
                    return Err(Fail::Conflict);
                }
                st.spc2.reserve(task.nexus)?;
                Ok(ScsiResponse::good())
            }
            op::RELEASE_6 | op::RELEASE_10 => {
                c.check_len(if opcode == op::RELEASE_6 { 6 } else { 10 })?;
                let mut st = self.state();
                if st.pr.reservation.is_some() {
                    return Err(Fail::Conflict);
                }
                st.spc2.release(task.nexus);
                Ok(ScsiResponse::good())
            }
            op::PR_IN => self.prin(c, task),
            op::PR_OUT => self.prout(c, task),
            op::START_STOP_UNIT => {
                c.check_len(6)?;
                // Power condition modifier / power conditions are not
                // supported beyond START_VALID (0h).
                let pc = c.u8(4) >> 4;
                if pc != 0 {
                    return Err(Sense::invalid_field_in_cdb(4, Some(7)).into());
                }
                if c.bit(4, 1) && self.state().nexus(task.nexus).prevent {
                    return Err(Sense::illegal(Asc::MEDIUM_REMOVAL_PREVENTED).into());
                }
                Ok(ScsiResponse::good())
            }
            op::PREVENT_ALLOW => {
                c.check_len(6)?;
                let prevent = c.u8(4) & 0x03;
                if prevent > 1 {
                    return Err(Sense::invalid_field_in_cdb(4, Some(1)).into());
                }
                self.state().nexus(task.nexus).prevent = prevent == 1;
                Ok(ScsiResponse::good())
            }
            op::MAINTENANCE_IN => self.maintenance_in(c, task),
            op::REPORT_LUNS => Err(Sense::invalid_opcode().into()),
            _ => self.sbc(ch, c, task, snap).await,
        }
    }

    pub(crate) fn facts(&self) -> InquiryFacts<'_> {
        InquiryFacts {
            vendor: &self.config.vendor,
            product: &self.config.product,
            revision: &self.config.revision,
            serial: &self.serial,
            naa: self.naa,
            thin: self.config.thin_provisioning,
            block_size: self.block_size(),
            max_transfer_blocks: self.max_transfer(),
            optimal_transfer_blocks: self.chunk_blocks(),
            max_unmap_lba_count: MAX_UNMAP_LBA_COUNT,
            max_unmap_descriptors: MAX_UNMAP_DESCRIPTORS,
            max_write_same_blocks: self.max_write_same_blocks(),
            max_compare_and_write_blocks: u8::try_from(
                self.max_transfer()
                    .min(u32::from(MAX_COMPARE_AND_WRITE_BLOCKS)),
            )
            .unwrap_or(1),
        }
    }

    fn request_sense(&self, c: &Cdb<'_>, task: &ScsiTask<'_>) -> CmdResult {
        c.check_len(6)?;
        let desc = c.bit(1, 0);
        let ua = self.state().nexus(task.nexus).ua.pop_front();
        let s = match ua {
            Some(asc) => Sense::new(SenseKey::UnitAttention, asc),
            None => Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE),
        };
        good_with(&s.encode(desc), usize::from(c.u8(4)), task)
    }

    fn mode_select(&self, c: &Cdb<'_>, task: &ScsiTask<'_>) -> CmdResult {
        let ten = c.opcode() == op::MODE_SELECT_10;
        c.check_len(if ten { 10 } else { 6 })?;
        let len = if ten {
            usize::from(c.be16(7))
        } else {
            usize::from(c.u8(4))
        };
        if len > 0 && !c.bit(1, 4) {
            // PF=0: vendor-specific page format is not supported.
            return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
        }
        let params = param_list(task, len)?;
        let mut st = self.state();
        let next = mode::select(c, &params, &st.mode, &self.default_mode, self.block_size())?;
        if next != st.mode {
            st.mode = next;
            st.ua_all(Asc::MODE_PARAMETERS_CHANGED, Some(task.nexus));
        }
        Ok(ScsiResponse::good())
    }

    fn prin(&self, c: &Cdb<'_>, task: &ScsiTask<'_>) -> CmdResult {
        c.check_len(10)?;
        let sa = c.u8(1) & 0x1f;
        let alloc = usize::from(c.be16(7));
        let d = self
            .state()
            .pr
            .prin(sa)
            .ok_or_else(|| Fail::from(Sense::invalid_field_in_cdb(1, Some(4))))?;
        good_with(&d, alloc, task)
    }

    fn prout(&self, c: &Cdb<'_>, task: &ScsiTask<'_>) -> CmdResult {
        c.check_len(10)?;
        let sa = c.u8(1) & 0x1f;
        if sa > 7 {
            return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
        }
        let len = c.be32(5) as usize;
        if sa == super::pr::sa::REGISTER_AND_MOVE {
            return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
        }
        if len != 24 {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let params = ProutParams::parse(&param_list(task, len)?)?;
        let mut st = self.state();
        if st.spc2.blocks(task.nexus) {
            return Err(Fail::Conflict);
        }
        let ua = st.pr.prout(task.nexus, sa, c.u8(2), &params)?;
        st.deliver(ua);
        Ok(ScsiResponse::good())
    }

    fn maintenance_in(&self, c: &Cdb<'_>, task: &ScsiTask<'_>) -> CmdResult {
        c.check_len(12)?;
        let alloc = c.be32(6) as usize;
        match c.u8(1) & 0x1f {
            op::MI_REPORT_SUPPORTED_OPCODES => {
                let d = opcodes::report_supported_opcodes(c)?;
                good_with(&d, alloc, task)
            }
            op::MI_REPORT_SUPPORTED_TMF => {
                good_with(&opcodes::report_supported_tmf(c), alloc, task)
            }
            op::MI_REPORT_TARGET_PORT_GROUPS => {
                let extended = c.u8(1) >> 5 == 1;
                let ports: Vec<u16> = self.state().ports.iter().copied().collect();
                let mut desc = vec![0x80, 0x01];
                desc.extend_from_slice(&inquiry::TARGET_PORT_GROUP.to_be_bytes());
                desc.extend_from_slice(&[0, 0, 0, u8::try_from(ports.len()).unwrap_or(255)]);
                for p in ports.iter().take(255) {
                    desc.extend_from_slice(&[0, 0]);
                    desc.extend_from_slice(&p.to_be_bytes());
                }
                let mut d = Vec::new();
                let len = u32::try_from(desc.len() + if extended { 4 } else { 0 }).unwrap_or(0);
                d.extend_from_slice(&len.to_be_bytes());
                if extended {
                    d.extend_from_slice(&[0x10, 0, 0, 0]);
                }
                d.extend_from_slice(&desc);
                good_with(&d, alloc, task)
            }
            _ => Err(Sense::invalid_field_in_cdb(1, Some(4)).into()),
        }
    }

    /// A task management reset issued through `by`.
    pub fn reset(&self, kind: ResetKind, by: &Nexus) {
        let _ = by;
        let mut st = self.state();
        st.spc2 = Spc2::default();
        for (_, _, s) in st.all_nexus_states() {
            s.prevent = false;
        }
        let asc = match kind {
            ResetKind::LogicalUnit | ResetKind::TargetWarm => {
                Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED
            }
            ResetKind::TargetCold => Asc::POWER_ON_OCCURRED,
        };
        if kind == ResetKind::TargetCold {
            st.mode = self.default_mode;
        }
        st.ua_all(asc, None);
    }

    /// The I_T nexus ended (session closed or reinstated): its SPC-2
    /// reservation and medium removal prevention end with it; persistent
    /// reservations stay.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let mut st = self.state();
        st.spc2.release(nexus);
        st.pr.nexus_lost(nexus);
        let mut removed = false;
        if let Some(v) = st.nexuses.get_mut(nexus.initiator_port.as_str()) {
            let before = v.len();
            v.retain(|(t, _)| *t != nexus.target_port);
            removed = v.len() != before;
            if v.is_empty() {
                st.nexuses.remove(nexus.initiator_port.as_str());
            }
        }
        if removed && !st.lost.iter().any(|l| is(l, nexus)) {
            st.lost.push_back(key(nexus));
            if st.lost.len() > MAX_LOST {
                st.lost.pop_front();
            }
        }
    }

    /// Queues a unit attention for every nexus (e.g. CAPACITY DATA HAS
    /// CHANGED after a resize).
    pub fn unit_attention_all(&self, asc: Asc) {
        self.state().ua_all(asc, None);
    }
}

fn task_has_cdb(c: &Cdb<'_>) -> bool {
    !c.0.is_empty()
}

/// The first `len` bytes of Data-Out as a parameter list; fewer than `len`
/// bytes is an error in the information unit (the initiator announced less
/// Data-Out than the CDB says).
pub(crate) fn param_list(task: &ScsiTask<'_>, len: usize) -> CmdResult<Vec<u8>> {
    let d = super::data::DataOut::new(&task.data_out);
    if d.len() < len {
        return Err(Sense::illegal(Asc::INVALID_FIELD_IN_INFORMATION_UNIT).into());
    }
    Ok(d.to_vec(0, len))
}

/// One `LogicalUnit` is shared by every session on every core.
#[allow(dead_code)]
fn assert_shared() {
    fn is<T: Send + Sync>() {}
    is::<LogicalUnit>();
}
