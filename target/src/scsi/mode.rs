//! Mode parameters (SPC-4 §7.5, SBC-3 §6.4): MODE SENSE(6/10) and MODE
//! SELECT(6/10) over the four pages a block target needs.
//!
//! Pages are generated from a small [`ModeState`] (the only changeable bits
//! are WCE, D_SENSE and SWP) rather than stored as bytes, so what MODE SENSE
//! reports is always what the logical unit actually does. MODE SELECT checks
//! every byte it does not allow to change against the current value and
//! rejects a difference with INVALID FIELD IN PARAMETER LIST pointing at it.
//! Saved values are not supported (nothing survives a restart).

use super::cdb::{op, Cdb};
use super::sense::{Asc, Sense};
use super::Fail;

/// Page codes.
pub const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
pub const PAGE_CACHING: u8 = 0x08;
pub const PAGE_CONTROL: u8 = 0x0a;
pub const PAGE_INFORMATIONAL_EXCEPTIONS: u8 = 0x1c;
pub const PAGE_ALL: u8 = 0x3f;

const PAGES: [u8; 4] = [
    PAGE_RW_ERROR_RECOVERY,
    PAGE_CACHING,
    PAGE_CONTROL,
    PAGE_INFORMATIONAL_EXCEPTIONS,
];

/// The changeable mode parameters of a logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    /// Caching page WCE: writes are acknowledged before they are durable.
    pub wce: bool,
    /// Control page D_SENSE: descriptor-format sense data.
    pub d_sense: bool,
    /// Control page SWP: the medium is write protected.
    pub swp: bool,
}

/// Page control field of MODE SENSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
}

/// One page as MODE SENSE shows it.
pub fn page(code: u8, pc: PageControl, cur: &ModeState, default: &ModeState) -> Option<Vec<u8>> {
    let st = match pc {
        PageControl::Current => *cur,
        PageControl::Default => *default,
        PageControl::Changeable => ModeState {
            wce: true,
            d_sense: true,
            swp: true,
        },
    };
    let changeable = pc == PageControl::Changeable;
    let mut p = match code {
        PAGE_RW_ERROR_RECOVERY => {
            let mut p = vec![0u8; 12];
            p[1] = 0x0a;
            p
        }
        PAGE_CACHING => {
            let mut p = vec![0u8; 20];
            p[1] = 0x12;
            if st.wce {
                p[2] |= 0x04;
            }
            p
        }
        PAGE_CONTROL => {
            let mut p = vec![0u8; 12];
            p[1] = 0x0a;
            if st.d_sense {
                p[2] |= 0x04;
            }
            if !changeable {
                // Queue algorithm modifier 1 (unrestricted reordering allowed).
                p[3] = 0x10;
                // Busy timeout period: unlimited.
                p[8] = 0xff;
                p[9] = 0xff;
            }
            if st.swp {
                p[4] |= 0x08;
            }
            p
        }
        PAGE_INFORMATIONAL_EXCEPTIONS => {
            let mut p = vec![0u8; 12];
            p[1] = 0x0a;
            p
        }
        _ => return None,
    };
    if let Some(b) = p.get_mut(0) {
        *b = code;
    }
    Some(p)
}

/// MODE SENSE(6) or (10) data.
pub fn sense_data(
    c: &Cdb<'_>,
    cur: &ModeState,
    default: &ModeState,
    read_only: bool,
    num_blocks: u64,
    block_size: u32,
) -> Result<Vec<u8>, Fail> {
    let ten = c.opcode() == op::MODE_SENSE_10;
    let dbd = c.bit(1, 3);
    let llbaa = ten && c.bit(1, 4);
    let pc = match c.u8(2) >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        _ => return Err(Sense::illegal(Asc::SAVING_PARAMETERS_NOT_SUPPORTED).into()),
    };
    let code = c.u8(2) & 0x3f;
    let subpage = c.u8(3);
    let mut pages = Vec::new();
    if code == PAGE_ALL {
        if subpage != 0 && subpage != 0xff {
            return Err(Sense::invalid_field_in_cdb(3, None).into());
        }
        for p in PAGES {
            pages.extend(page(p, pc, cur, default).unwrap_or_default());
        }
    } else {
        if subpage != 0 {
            return Err(Sense::invalid_field_in_cdb(3, None).into());
        }
        match page(code, pc, cur, default) {
            Some(p) => pages.extend(p),
            None => return Err(Sense::invalid_field_in_cdb(2, Some(5)).into()),
        }
    }
    let mut bd = Vec::new();
    if !dbd {
        if llbaa {
            bd.extend_from_slice(&num_blocks.to_be_bytes());
            bd.extend_from_slice(&[0; 4]);
            bd.extend_from_slice(&block_size.to_be_bytes());
        } else {
            let n = u32::try_from(num_blocks).unwrap_or(u32::MAX);
            bd.extend_from_slice(&n.to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&block_size.to_be_bytes()[1..]);
        }
    }
    let wp = if cur.swp || read_only { 0x80 } else { 0 };
    // DPOFUA: DPO and FUA are supported.
    let dev_specific = wp | 0x10;
    let mut d = Vec::new();
    if ten {
        let len = u16::try_from(6 + bd.len() + pages.len()).unwrap_or(u16::MAX);
        d.extend_from_slice(&len.to_be_bytes());
        d.push(0);
        d.push(dev_specific);
        d.push(u8::from(llbaa && !bd.is_empty()));
        d.push(0);
        d.extend_from_slice(&u16::try_from(bd.len()).unwrap_or(0).to_be_bytes());
    } else {
        let len = u8::try_from(3 + bd.len() + pages.len()).unwrap_or(u8::MAX);
        d.extend_from_slice(&[len, 0, dev_specific, u8::try_from(bd.len()).unwrap_or(0)]);
    }
    d.extend_from_slice(&bd);
    d.extend_from_slice(&pages);
    Ok(d)
}

/// MODE SELECT(6)/(10): validates `params` and returns the new state.
pub fn select(
    c: &Cdb<'_>,
    params: &[u8],
    cur: &ModeState,
    default: &ModeState,
    block_size: u32,
) -> Result<ModeState, Fail> {
    let ten = c.opcode() == op::MODE_SELECT_10;
    if c.bit(1, 0) {
        // SP: saving is not supported.
        return Err(Sense::invalid_field_in_cdb(1, Some(0)).into());
    }
    let hdr = if ten { 8 } else { 4 };
    if params.is_empty() {
        return Ok(*cur);
    }
    if params.len() < hdr {
        return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
    }
    let get = |i: usize| params.get(i).copied().unwrap_or(0);
    let bd_len = if ten {
        usize::from(u16::from_be_bytes([get(6), get(7)]))
    } else {
        usize::from(get(3))
    };
    let long = ten && get(4) & 1 != 0;
    let bd_unit = if long { 16 } else { 8 };
    if bd_len % bd_unit != 0 {
        let at = if ten { 6 } else { 3 };
        return Err(Sense::invalid_field_in_parameter_list(at, None).into());
    }
    if hdr + bd_len > params.len() {
        return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
    }
    // Block descriptors: the block length must be ours (0 keeps it).
    let mut at = hdr;
    while at < hdr + bd_len {
        let bl_at = if long { at + 12 } else { at + 5 };
        let bl = if long {
            u32::from_be_bytes([get(bl_at), get(bl_at + 1), get(bl_at + 2), get(bl_at + 3)])
        } else {
            u32::from_be_bytes([0, get(bl_at), get(bl_at + 1), get(bl_at + 2)])
        };
        if bl != 0 && bl != block_size {
            return Err(Sense::invalid_field_in_parameter_list(bl_at as u16, None).into());
        }
        at += bd_unit;
    }
    let mut next = *cur;
    let current_changeable = ModeState {
        wce: true,
        d_sense: true,
        swp: true,
    };
    while at < params.len() {
        let code = get(at) & 0x3f;
        if get(at) & 0x40 != 0 {
            // Subpage format: no subpages are supported.
            return Err(Sense::invalid_field_in_parameter_list(at as u16, Some(6)).into());
        }
        let Some(ours) = page(code, PageControl::Current, &next, default) else {
            return Err(Sense::invalid_field_in_parameter_list(at as u16, Some(5)).into());
        };
        let mask =
            page(code, PageControl::Changeable, &current_changeable, default).unwrap_or_default();
        let plen = usize::from(get(at + 1)) + 2;
        if plen != ours.len() {
            return Err(Sense::invalid_field_in_parameter_list(at as u16 + 1, None).into());
        }
        let Some(theirs) = params.get(at..at + plen) else {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR).into());
        };
        for i in 2..plen {
            let m = mask.get(i).copied().unwrap_or(0);
            let (a, b) = (
                theirs.get(i).copied().unwrap_or(0),
                ours.get(i).copied().unwrap_or(0),
            );
            if (a & !m) != (b & !m) {
                return Err(Sense::invalid_field_in_parameter_list((at + i) as u16, None).into());
            }
        }
        let t = |i: usize, bit: u8| theirs.get(i).is_some_and(|b| b & (1 << bit) != 0);
        match code {
            PAGE_CACHING => next.wce = t(2, 2),
            PAGE_CONTROL => {
                next.d_sense = t(2, 2);
                next.swp = t(4, 3);
            }
            _ => {}
        }
        at += plen;
    }
    Ok(next)
}
