//! The command table: every operation code (and service action) this layer
//! implements, with its CDB usage data, for REPORT SUPPORTED OPERATION CODES
//! (SPC-4 §6.35) and REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (§6.36).
//!
//! The usage masks mark the CDB bits the dispatcher actually reads; keeping
//! the table next to nothing but itself makes it easy to check against the
//! dispatcher in a test (every entry must execute without INVALID COMMAND
//! OPERATION CODE).

use super::cdb::{op, Cdb};
use super::sense::Sense;
use super::Fail;

/// One supported command.
#[derive(Debug, Clone, Copy)]
pub struct Command {
    pub opcode: u8,
    /// Service action for commands that have them.
    pub service_action: Option<u8>,
    /// CDB usage data: its length is the CDB length.
    pub usage: &'static [u8],
}

macro_rules! cmd {
    ($op:expr, $usage:expr) => {
        Command {
            opcode: $op,
            service_action: None,
            usage: &$usage,
        }
    };
    ($op:expr, sa $sa:expr, $usage:expr) => {
        Command {
            opcode: $op,
            service_action: Some($sa),
            usage: &$usage,
        }
    };
}

const C: u8 = 0x04; // control byte: NACA is checked

/// Every command, in opcode order.
pub static COMMANDS: &[Command] = &[
    cmd!(op::TEST_UNIT_READY, [op::TEST_UNIT_READY, 0, 0, 0, 0, C]),
    cmd!(op::REQUEST_SENSE, [op::REQUEST_SENSE, 0x01, 0, 0, 0xff, C]),
    cmd!(op::READ_6, [op::READ_6, 0x1f, 0xff, 0xff, 0xff, C]),
    cmd!(op::WRITE_6, [op::WRITE_6, 0x1f, 0xff, 0xff, 0xff, C]),
    cmd!(op::INQUIRY, [op::INQUIRY, 0x01, 0xff, 0xff, 0xff, C]),
    cmd!(op::MODE_SELECT_6, [op::MODE_SELECT_6, 0x11, 0, 0, 0xff, C]),
    cmd!(op::RESERVE_6, [op::RESERVE_6, 0, 0, 0, 0, C]),
    cmd!(op::RELEASE_6, [op::RELEASE_6, 0, 0, 0, 0, C]),
    cmd!(
        op::MODE_SENSE_6,
        [op::MODE_SENSE_6, 0x08, 0xff, 0xff, 0xff, C]
    ),
    cmd!(
        op::START_STOP_UNIT,
        [op::START_STOP_UNIT, 0x01, 0, 0x0f, 0xf7, C]
    ),
    cmd!(op::PREVENT_ALLOW, [op::PREVENT_ALLOW, 0, 0, 0, 0x03, C]),
    cmd!(
        op::READ_CAPACITY_10,
        [
            op::READ_CAPACITY_10,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            0,
            0x01,
            C
        ]
    ),
    cmd!(
        op::READ_10,
        [
            op::READ_10,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            0xff,
            0xff,
            C
        ]
    ),
    cmd!(
        op::WRITE_10,
        [
            op::WRITE_10,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            0xff,
            0xff,
            C
        ]
    ),
    cmd!(
        op::WRITE_VERIFY_10,
        [
            op::WRITE_VERIFY_10,
            0xf6,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            0xff,
            0xff,
            C
        ]
    ),
    cmd!(
        op::VERIFY_10,
        [
            op::VERIFY_10,
            0xf6,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            0xff,
            0xff,
            C
        ]
    ),
    cmd!(
        op::PREFETCH_10,
        [
            op::PREFETCH_10,
            0x02,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            0xff,
            0xff,
            C
        ]
    ),
    cmd!(
        op::SYNC_CACHE_10,
        [
            op::SYNC_CACHE_10,
            0x02,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            0xff,
            0xff,
            C
        ]
    ),
    cmd!(
        op::WRITE_SAME_10,
        [
            op::WRITE_SAME_10,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            0xff,
            0xff,
            C
        ]
    ),
    cmd!(
        op::UNMAP,
        [op::UNMAP, 0x01, 0, 0, 0, 0, 0x1f, 0xff, 0xff, C]
    ),
    cmd!(
        op::MODE_SELECT_10,
        [op::MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, C]
    ),
    cmd!(op::RESERVE_10, [op::RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, C]),
    cmd!(op::RELEASE_10, [op::RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, C]),
    cmd!(
        op::MODE_SENSE_10,
        [op::MODE_SENSE_10, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, C]
    ),
    cmd!(op::PR_IN, sa 0x00, [op::PR_IN, 0x00, 0, 0, 0, 0, 0, 0xff, 0xff, C]),
    cmd!(op::PR_IN, sa 0x01, [op::PR_IN, 0x01, 0, 0, 0, 0, 0, 0xff, 0xff, C]),
    cmd!(op::PR_IN, sa 0x02, [op::PR_IN, 0x02, 0, 0, 0, 0, 0, 0xff, 0xff, C]),
    cmd!(op::PR_IN, sa 0x03, [op::PR_IN, 0x03, 0, 0, 0, 0, 0, 0xff, 0xff, C]),
    cmd!(op::PR_OUT, sa 0x00, [op::PR_OUT, 0x00, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C]),
    cmd!(op::PR_OUT, sa 0x01, [op::PR_OUT, 0x01, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C]),
    cmd!(op::PR_OUT, sa 0x02, [op::PR_OUT, 0x02, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C]),
    cmd!(op::PR_OUT, sa 0x03, [op::PR_OUT, 0x03, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C]),
    cmd!(op::PR_OUT, sa 0x04, [op::PR_OUT, 0x04, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C]),
    cmd!(op::PR_OUT, sa 0x05, [op::PR_OUT, 0x05, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C]),
    cmd!(op::PR_OUT, sa 0x06, [op::PR_OUT, 0x06, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, C]),
    cmd!(
        op::READ_16,
        [
            op::READ_16,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::COMPARE_AND_WRITE,
        [
            op::COMPARE_AND_WRITE,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            0,
            0,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::ORWRITE_16,
        [
            op::ORWRITE_16,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::WRITE_16,
        [
            op::WRITE_16,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::WRITE_VERIFY_16,
        [
            op::WRITE_VERIFY_16,
            0xf6,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::VERIFY_16,
        [
            op::VERIFY_16,
            0xf6,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::PREFETCH_16,
        [
            op::PREFETCH_16,
            0x02,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::SYNC_CACHE_16,
        [
            op::SYNC_CACHE_16,
            0x02,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::WRITE_SAME_16,
        [
            op::WRITE_SAME_16,
            0xf9,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(op::SERVICE_ACTION_IN_16, sa op::SAI_READ_CAPACITY_16, [op::SERVICE_ACTION_IN_16, op::SAI_READ_CAPACITY_16, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, C]),
    cmd!(op::SERVICE_ACTION_IN_16, sa op::SAI_GET_LBA_STATUS, [op::SERVICE_ACTION_IN_16, op::SAI_GET_LBA_STATUS, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, C]),
    cmd!(
        op::REPORT_LUNS,
        [
            op::REPORT_LUNS,
            0,
            0xff,
            0,
            0,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            C
        ]
    ),
    cmd!(op::MAINTENANCE_IN, sa op::MI_REPORT_TARGET_PORT_GROUPS, [op::MAINTENANCE_IN, op::MI_REPORT_TARGET_PORT_GROUPS | 0xe0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, C]),
    cmd!(op::MAINTENANCE_IN, sa op::MI_REPORT_SUPPORTED_OPCODES, [op::MAINTENANCE_IN, op::MI_REPORT_SUPPORTED_OPCODES, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, C]),
    cmd!(op::MAINTENANCE_IN, sa op::MI_REPORT_SUPPORTED_TMF, [op::MAINTENANCE_IN, op::MI_REPORT_SUPPORTED_TMF, 0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, C]),
    cmd!(
        op::READ_12,
        [
            op::READ_12,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::WRITE_12,
        [
            op::WRITE_12,
            0xf8,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::WRITE_VERIFY_12,
        [
            op::WRITE_VERIFY_12,
            0xf6,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
    cmd!(
        op::VERIFY_12,
        [
            op::VERIFY_12,
            0xf6,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x1f,
            C
        ]
    ),
];

/// Whether `opcode` is one that has service actions here.
fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// Nominal / recommended command timeouts we report, in seconds.
const TIMEOUT_SECS: u32 = 30;

fn timeouts_descriptor() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0a;
    t[4..8].copy_from_slice(&TIMEOUT_SECS.to_be_bytes());
    t[8..12].copy_from_slice(&TIMEOUT_SECS.to_be_bytes());
    t
}

/// REPORT SUPPORTED OPERATION CODES data.
pub fn report_supported_opcodes(c: &Cdb<'_>) -> Result<Vec<u8>, Fail> {
    let rctd = c.bit(2, 7);
    let options = c.u8(2) & 0x07;
    let req_op = c.u8(3);
    let req_sa = c.be16(4);
    let mut d = Vec::new();
    let one = |cmd: Option<&Command>, d: &mut Vec<u8>| match cmd {
        None => d.extend_from_slice(&[0, 0x01, 0, 0]),
        Some(cmd) => {
            d.push(0);
            d.push(if rctd { 0x83 } else { 0x03 });
            d.extend_from_slice(&u16::try_from(cmd.usage.len()).unwrap_or(0).to_be_bytes());
            d.extend_from_slice(cmd.usage);
            if rctd {
                d.extend_from_slice(&timeouts_descriptor());
            }
        }
    };
    match options {
        0 => {
            let mut body = Vec::new();
            for cmd in COMMANDS {
                body.push(cmd.opcode);
                body.push(0);
                body.extend_from_slice(&u16::from(cmd.service_action.unwrap_or(0)).to_be_bytes());
                body.push(0);
                let mut f = 0;
                if cmd.service_action.is_some() {
                    f |= 0x01;
                }
                if rctd {
                    f |= 0x02;
                }
                body.push(f);
                body.extend_from_slice(&u16::try_from(cmd.usage.len()).unwrap_or(0).to_be_bytes());
                if rctd {
                    body.extend_from_slice(&timeouts_descriptor());
                }
            }
            d.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes());
            d.extend_from_slice(&body);
        }
        1 => {
            if has_service_actions(req_op) {
                return Err(Sense::invalid_field_in_cdb(2, Some(0)).into());
            }
            one(COMMANDS.iter().find(|x| x.opcode == req_op), &mut d);
        }
        2 => {
            if !has_service_actions(req_op) {
                return Err(Sense::invalid_field_in_cdb(2, Some(0)).into());
            }
            one(
                COMMANDS.iter().find(|x| {
                    x.opcode == req_op && x.service_action.map(u16::from) == Some(req_sa)
                }),
                &mut d,
            );
        }
        3 => {
            let found = COMMANDS.iter().find(|x| {
                x.opcode == req_op && x.service_action.map_or(true, |s| u16::from(s) == req_sa)
            });
            one(found, &mut d);
        }
        _ => return Err(Sense::invalid_field_in_cdb(2, Some(0)).into()),
    }
    Ok(d)
}

/// REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS data: ABORT TASK, ABORT TASK
/// SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET (what the iSCSI
/// layer implements); the extended format when REPD is set.
pub fn report_supported_tmf(c: &Cdb<'_>) -> Vec<u8> {
    let repd = c.bit(2, 7);
    let mut d = vec![0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0, 0, 0];
    if repd {
        d[3] = 0x0c;
        d.resize(16, 0);
    }
    d
}
