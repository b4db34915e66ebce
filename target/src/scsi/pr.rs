//! Reservations: SPC-4 persistent reservations (§5.13) and SPC-2
//! RESERVE/RELEASE, as a pure state machine.
//!
//! The state is plain data owned by the logical unit (under its mutex); each
//! PERSISTENT RESERVE OUT service action is a method that either fails with
//! sense / RESERVATION CONFLICT without changing anything, or applies the
//! change and returns the unit attentions it established for other I_T
//! nexuses. Keeping it free of I/O and locking makes the whole conflict
//! matrix testable with plain unit tests.
//!
//! Persistence across power loss (APTPL) is not offered: REPORT
//! CAPABILITIES says PTPL_C=0 and APTPL=1 is rejected, rather than claimed
//! and lost on restart. Registrations with ALL_TG_PT apply to every target
//! port. SPEC_I_PT and REGISTER AND MOVE are not supported and rejected.

use super::sense::{Asc, Sense};
use super::task::Nexus;
use super::Fail;

/// Reservation types (SPC-4 Table 172).
#[allow(dead_code)]
pub mod kind {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_RO: u8 = 5;
    pub const EXCLUSIVE_ACCESS_RO: u8 = 6;
    pub const WRITE_EXCLUSIVE_AR: u8 = 7;
    pub const EXCLUSIVE_ACCESS_AR: u8 = 8;
}

fn valid_type(t: u8) -> bool {
    matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
}

fn all_registrants(t: u8) -> bool {
    matches!(t, kind::WRITE_EXCLUSIVE_AR | kind::EXCLUSIVE_ACCESS_AR)
}

fn registrants_only(t: u8) -> bool {
    matches!(t, kind::WRITE_EXCLUSIVE_RO | kind::EXCLUSIVE_ACCESS_RO)
}

fn exclusive_access(t: u8) -> bool {
    matches!(
        t,
        kind::EXCLUSIVE_ACCESS | kind::EXCLUSIVE_ACCESS_RO | kind::EXCLUSIVE_ACCESS_AR
    )
}

/// How a command accesses the medium, for the conflict tables (SPC-4
/// §5.13.1 Table 61 and SBC-3 §4.17.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, TEST UNIT READY, ...).
    Always,
    /// Reads: allowed under Write Exclusive types, conflict under Exclusive Access.
    Read,
    /// Writes and state changes: conflict under every type for non-holders.
    Write,
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Initiator port name (with ISID).
    pub initiator: String,
    /// Target port, or `None` when registered with ALL_TG_PT.
    pub target: Option<String>,
    /// Relative target port it registered through.
    pub relative_port: u16,
    /// Reservation key.
    pub key: u64,
}

impl Registration {
    fn matches(&self, n: &Nexus) -> bool {
        self.initiator == n.initiator_port
            && self.target.as_deref().map_or(true, |t| t == n.target_port)
    }
}

/// The persistent reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The I_T nexus that holds it (for all-registrants types: the one that
    /// created it; every registrant is a holder).
    pub initiator: String,
    pub target: String,
    /// Type (see [`kind`]).
    pub rtype: u8,
}

/// Whom a unit attention goes to: every I_T nexus of this initiator port
/// (through `target`, or through every port when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UaTarget {
    pub initiator: String,
    pub target: Option<String>,
    pub asc: Asc,
}

/// Persistent reservation state of one logical unit.
#[derive(Debug, Default, Clone)]
pub struct PrState {
    /// PRgeneration.
    pub generation: u32,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
}

/// A parsed basic PERSISTENT RESERVE OUT parameter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProutParams {
    pub key: u64,
    pub sa_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
}

/// PERSISTENT RESERVE OUT service actions.
pub mod sa {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    pub const REGISTER_AND_MOVE: u8 = 7;
}

impl ProutParams {
    /// Parses the 24-byte basic parameter list.
    pub fn parse(p: &[u8]) -> Result<Self, Fail> {
        if p.len() != 24 {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let be64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(p.get(at..at + 8).unwrap_or(&[0; 8]));
            u64::from_be_bytes(b)
        };
        let flags = p.get(20).copied().unwrap_or(0);
        Ok(ProutParams {
            key: be64(0),
            sa_key: be64(8),
            spec_i_pt: flags & 0x08 != 0,
            all_tg_pt: flags & 0x04 != 0,
            aptpl: flags & 0x01 != 0,
        })
    }
}

fn conflict<T>() -> Result<T, Fail> {
    Err(Fail::Conflict)
}

impl PrState {
    /// The registration of `n`, if any.
    pub fn registration(&self, n: &Nexus) -> Option<&Registration> {
        self.registrations.iter().find(|r| r.matches(n))
    }

    /// Whether `n` holds the reservation (every registrant does for
    /// all-registrants types).
    pub fn is_holder(&self, n: &Nexus) -> bool {
        match &self.reservation {
            None => false,
            Some(r) if all_registrants(r.rtype) => self.registration(n).is_some(),
            Some(r) => r.initiator == n.initiator_port && r.target == n.target_port,
        }
    }

    /// Whether a command with `access` from `n` conflicts with the
    /// persistent reservation.
    pub fn conflicts(&self, n: &Nexus, access: Access) -> bool {
        let Some(r) = &self.reservation else {
            return false;
        };
        if access == Access::Always || self.is_holder(n) {
            return false;
        }
        if (registrants_only(r.rtype) || all_registrants(r.rtype)) && self.registration(n).is_some()
        {
            return false;
        }
        match access {
            Access::Read => exclusive_access(r.rtype),
            _ => true,
        }
    }

    /// UAs for every registrant except `n`.
    fn ua_others(&self, n: &Nexus, asc: Asc) -> Vec<UaTarget> {
        self.registrations
            .iter()
            .filter(|r| !r.matches(n))
            .map(|r| UaTarget {
                initiator: r.initiator.clone(),
                target: r.target.clone(),
                asc,
            })
            .collect()
    }

    /// Executes one PERSISTENT RESERVE OUT service action for `n`.
    /// `scope_type` is CDB byte 2.
    pub fn prout(
        &mut self,
        n: &Nexus,
        service_action: u8,
        scope_type: u8,
        p: &ProutParams,
    ) -> Result<Vec<UaTarget>, Fail> {
        let scope = scope_type >> 4;
        let rtype = scope_type & 0x0f;
        if p.aptpl {
            // PTPL_C = 0: we cannot keep registrations across power loss.
            return Err(Sense::invalid_field_in_parameter_list(20, Some(0)).into());
        }
        if p.spec_i_pt {
            return Err(Sense::invalid_field_in_parameter_list(20, Some(3)).into());
        }
        match service_action {
            sa::REGISTER | sa::REGISTER_AND_IGNORE => {
                self.register(n, p, service_action == sa::REGISTER_AND_IGNORE)
            }
            sa::RESERVE | sa::RELEASE | sa::CLEAR | sa::PREEMPT | sa::PREEMPT_AND_ABORT => {
                match self.registration(n) {
                    Some(r) if r.key == p.key => {}
                    _ => return conflict(),
                }
                let needs_type = matches!(
                    service_action,
                    sa::RESERVE | sa::RELEASE | sa::PREEMPT | sa::PREEMPT_AND_ABORT
                );
                if needs_type && scope != 0 {
                    return Err(Sense::invalid_field_in_cdb(2, Some(4)).into());
                }
                if needs_type && !valid_type(rtype) {
                    return Err(Sense::invalid_field_in_cdb(2, Some(0)).into());
                }
                match service_action {
                    sa::RESERVE => self.reserve(n, rtype),
                    sa::RELEASE => self.release(n, rtype),
                    sa::CLEAR => self.clear(n),
                    _ => self.preempt(n, rtype, p.sa_key),
                }
            }
            sa::REGISTER_AND_MOVE => Err(Sense::invalid_field_in_cdb(1, Some(0)).into()),
            _ => Err(Sense::invalid_field_in_cdb(1, Some(0)).into()),
        }
    }

    fn register(
        &mut self,
        n: &Nexus,
        p: &ProutParams,
        ignore: bool,
    ) -> Result<Vec<UaTarget>, Fail> {
        let existing = self.registrations.iter().position(|r| r.matches(n));
        let Some(i) = existing else {
            if !ignore && p.key != 0 {
                return conflict();
            }
            if p.sa_key != 0 {
                self.registrations.push(Registration {
                    initiator: n.initiator_port.clone(),
                    target: if p.all_tg_pt {
                        None
                    } else {
                        Some(n.target_port.clone())
                    },
                    relative_port: n.relative_port,
                    key: p.sa_key,
                });
            }
            self.generation = self.generation.wrapping_add(1);
            return Ok(Vec::new());
        };
        let current = self.registrations.get(i).map(|r| r.key).unwrap_or(0);
        if !ignore && current != p.key {
            return conflict();
        }
        self.generation = self.generation.wrapping_add(1);
        if p.sa_key != 0 {
            if let Some(r) = self.registrations.get_mut(i) {
                r.key = p.sa_key;
            }
            return Ok(Vec::new());
        }
        Ok(self.unregister(n, i))
    }

    /// Removes registration `i` (that of `n`) with its effect on the reservation.
    fn unregister(&mut self, n: &Nexus, i: usize) -> Vec<UaTarget> {
        let was_holder = self.is_holder(n);
        if i < self.registrations.len() {
            self.registrations.remove(i);
        }
        let Some(r) = self.reservation.clone() else {
            return Vec::new();
        };
        if all_registrants(r.rtype) {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
            return Vec::new();
        }
        if !was_holder {
            return Vec::new();
        }
        self.reservation = None;
        if registrants_only(r.rtype) {
            return self.ua_others(n, Asc::RESERVATIONS_RELEASED);
        }
        Vec::new()
    }

    fn reserve(&mut self, n: &Nexus, rtype: u8) -> Result<Vec<UaTarget>, Fail> {
        match &self.reservation {
            Some(r) if self.is_holder(n) && r.rtype == rtype => Ok(Vec::new()),
            Some(_) => conflict(),
            None => {
                self.reservation = Some(Reservation {
                    initiator: n.initiator_port.clone(),
                    target: n.target_port.clone(),
                    rtype,
                });
                Ok(Vec::new())
            }
        }
    }

    fn release(&mut self, n: &Nexus, rtype: u8) -> Result<Vec<UaTarget>, Fail> {
        let Some(r) = self.reservation.clone() else {
            return Ok(Vec::new());
        };
        if !self.is_holder(n) {
            return Ok(Vec::new());
        }
        if r.rtype != rtype {
            return Err(Sense::illegal(Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION).into());
        }
        self.reservation = None;
        if registrants_only(r.rtype) || all_registrants(r.rtype) {
            return Ok(self.ua_others(n, Asc::RESERVATIONS_RELEASED));
        }
        Ok(Vec::new())
    }

    fn clear(&mut self, n: &Nexus) -> Result<Vec<UaTarget>, Fail> {
        let ua = self.ua_others(n, Asc::RESERVATIONS_PREEMPTED);
        self.registrations.clear();
        self.reservation = None;
        self.generation = self.generation.wrapping_add(1);
        Ok(ua)
    }

    /// Removes every registration with `key` except `n`'s own; returns UAs
    /// for the removed ones.
    fn remove_key(&mut self, n: &Nexus, key: u64) -> Vec<UaTarget> {
        let mut ua = Vec::new();
        self.registrations.retain(|r| {
            if r.key == key && !r.matches(n) {
                ua.push(UaTarget {
                    initiator: r.initiator.clone(),
                    target: r.target.clone(),
                    asc: Asc::REGISTRATIONS_PREEMPTED,
                });
                false
            } else {
                true
            }
        });
        ua
    }

    fn preempt(&mut self, n: &Nexus, rtype: u8, sa_key: u64) -> Result<Vec<UaTarget>, Fail> {
        let own_key = self.registration(n).map(|r| r.key);
        let holds_key = |s: &Self, key: u64| {
            s.registrations
                .iter()
                .any(|r| r.key == key && !r.matches(n))
                || own_key == Some(key)
        };
        let new_res = Reservation {
            initiator: n.initiator_port.clone(),
            target: n.target_port.clone(),
            rtype,
        };
        let ua = match self.reservation.clone() {
            None => {
                if sa_key == 0 {
                    return Err(Sense::invalid_field_in_parameter_list(8, None).into());
                }
                if !holds_key(self, sa_key) {
                    return conflict();
                }
                self.remove_key(n, sa_key)
            }
            Some(r) if all_registrants(r.rtype) => {
                if sa_key == 0 {
                    let mut ua = Vec::new();
                    self.registrations.retain(|x| {
                        if x.matches(n) {
                            true
                        } else {
                            ua.push(UaTarget {
                                initiator: x.initiator.clone(),
                                target: x.target.clone(),
                                asc: Asc::REGISTRATIONS_PREEMPTED,
                            });
                            false
                        }
                    });
                    self.reservation = Some(new_res);
                    ua
                } else {
                    if !holds_key(self, sa_key) {
                        return conflict();
                    }
                    self.remove_key(n, sa_key)
                }
            }
            Some(r) => {
                let holder_key = self
                    .registrations
                    .iter()
                    .find(|x| {
                        x.initiator == r.initiator
                            && x.target.as_deref().map_or(true, |t| t == r.target)
                    })
                    .map(|x| x.key);
                if sa_key == 0 {
                    return Err(Sense::invalid_field_in_parameter_list(8, None).into());
                }
                if holder_key == Some(sa_key) {
                    let mut ua = self.remove_key(n, sa_key);
                    let changed = r.rtype != rtype;
                    self.reservation = Some(new_res);
                    if changed {
                        let removed: Vec<_> = ua.clone();
                        for o in self.ua_others(n, Asc::RESERVATIONS_RELEASED) {
                            if !removed
                                .iter()
                                .any(|x| x.initiator == o.initiator && x.target == o.target)
                            {
                                ua.push(o);
                            }
                        }
                    }
                    ua
                } else {
                    if !holds_key(self, sa_key) {
                        return conflict();
                    }
                    self.remove_key(n, sa_key)
                }
            }
        };
        self.generation = self.generation.wrapping_add(1);
        Ok(ua)
    }

    /// The nexus is gone: SPC-2 state is not kept here; registrations and
    /// the persistent reservation survive I_T nexus loss (SPC-4 §5.13.1).
    pub fn nexus_lost(&mut self, _n: &Nexus) {}

    /// PERSISTENT RESERVE IN data for `service_action` (0..=3), or `None`
    /// for an unsupported one.
    pub fn prin(&self, service_action: u8) -> Option<Vec<u8>> {
        let mut d = Vec::new();
        match service_action {
            0 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                let len = u32::try_from(8 * self.registrations.len()).unwrap_or(u32::MAX);
                d.extend_from_slice(&len.to_be_bytes());
                for r in &self.registrations {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            1 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                match &self.reservation {
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                    Some(r) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        let key = if all_registrants(r.rtype) {
                            0
                        } else {
                            self.registrations
                                .iter()
                                .find(|x| {
                                    x.initiator == r.initiator
                                        && x.target.as_deref().map_or(true, |t| t == r.target)
                                })
                                .map(|x| x.key)
                                .unwrap_or(0)
                        };
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0, 0, 0, 0, 0, r.rtype & 0x0f, 0, 0]);
                    }
                }
            }
            2 => {
                // REPORT CAPABILITIES: length 8; ATP_C; TMV with the type mask.
                d.extend_from_slice(&[0, 8, 0x04, 0x80, 0xea, 0x01, 0, 0]);
            }
            3 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                let mut body = Vec::new();
                for r in &self.registrations {
                    let holder = match &self.reservation {
                        Some(res) if all_registrants(res.rtype) => Some(res.rtype),
                        Some(res)
                            if res.initiator == r.initiator
                                && r.target.as_deref().map_or(true, |t| t == res.target) =>
                        {
                            Some(res.rtype)
                        }
                        _ => None,
                    };
                    body.extend_from_slice(&r.key.to_be_bytes());
                    body.extend_from_slice(&[0; 4]);
                    let mut f = 0u8;
                    if r.target.is_none() {
                        f |= 0x02;
                    }
                    if holder.is_some() {
                        f |= 0x01;
                    }
                    body.push(f);
                    body.push(holder.unwrap_or(0) & 0x0f);
                    body.extend_from_slice(&[0; 4]);
                    body.extend_from_slice(&r.relative_port.to_be_bytes());
                    let tid = transport_id(&r.initiator);
                    let tl = u32::try_from(tid.len()).unwrap_or(0);
                    body.extend_from_slice(&tl.to_be_bytes());
                    body.extend_from_slice(&tid);
                }
                let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
                d.extend_from_slice(&len.to_be_bytes());
                d.extend_from_slice(&body);
            }
            _ => return None,
        }
        Some(d)
    }
}

/// An iSCSI TransportID (SPC-4 §7.6.4.6) for an initiator port name: format
/// 01b ("name,i,0xISID") when the name carries an ISID, 00b otherwise;
/// NUL terminated and padded to a multiple of 4 bytes.
pub fn transport_id(initiator_port: &str) -> Vec<u8> {
    let format: u8 = if initiator_port.contains(",i,0x") {
        0x40
    } else {
        0
    };
    let mut name = initiator_port.as_bytes().to_vec();
    name.push(0);
    while name.len() % 4 != 0 || name.len() < 20 {
        name.push(0);
    }
    let mut t = vec![format | 0x05, 0];
    t.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_be_bytes());
    t.extend_from_slice(&name);
    t
}

/// SPC-2 RESERVE(6)/(10) and RELEASE: one holder nexus at a time.
#[derive(Debug, Default, Clone)]
pub struct Spc2 {
    /// (initiator port, target port) of the holder.
    pub holder: Option<(String, String)>,
}

impl Spc2 {
    fn key(n: &Nexus) -> (String, String) {
        (n.initiator_port.clone(), n.target_port.clone())
    }

    /// Whether `n` is blocked by a reservation someone else holds.
    pub fn blocks(&self, n: &Nexus) -> bool {
        self.holder
            .as_ref()
            .is_some_and(|(i, t)| *i != n.initiator_port || *t != n.target_port)
    }

    /// RESERVE: conflicts if another nexus holds it.
    pub fn reserve(&mut self, n: &Nexus) -> Result<(), Fail> {
        if self.blocks(n) {
            return conflict();
        }
        self.holder = Some(Self::key(n));
        Ok(())
    }

    /// RELEASE: a no-op unless `n` holds it.
    pub fn release(&mut self, n: &Nexus) {
        if self.holder.as_ref() == Some(&Self::key(n)) {
            self.holder = None;
        }
    }
}

#[cfg(test)]
mod tests;
