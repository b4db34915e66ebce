//! INQUIRY (SPC-4 §6.6): standard data and the VPD pages a block target is
//! expected to have (00h, 80h, 83h, B0h, B1h, B2h).
//!
//! Everything is computed from the logical unit's configuration and the
//! volume's geometry on each call (INQUIRY is rare), so the answers cannot
//! drift from what the command layer really does: the limits in Block
//! Limits are the ones the READ/WRITE/UNMAP/WRITE SAME handlers enforce,
//! LBPRZ is set because an unmapped range reads back as zeroes on every
//! backend, TPGS=01b because REPORT TARGET PORT GROUPS answers (one group,
//! active/optimized), 3PC=0 and PROTECT=0 because EXTENDED COPY and
//! protection information are not implemented.

use super::cdb::Cdb;
use super::sense::Sense;
use super::task::Nexus;
use super::Fail;

/// VPD page codes.
pub const VPD_SUPPORTED: u8 = 0x00;
pub const VPD_SERIAL: u8 = 0x80;
pub const VPD_DEVICE_ID: u8 = 0x83;
pub const VPD_BLOCK_LIMITS: u8 = 0xb0;
pub const VPD_BLOCK_CHARACTERISTICS: u8 = 0xb1;
pub const VPD_LBP: u8 = 0xb2;

/// The target port group every port of ours is in.
pub const TARGET_PORT_GROUP: u16 = 1;

/// Facts INQUIRY reports, gathered by the logical unit.
#[derive(Debug, Clone)]
pub struct InquiryFacts<'a> {
    pub vendor: &'a str,
    pub product: &'a str,
    pub revision: &'a str,
    pub serial: &'a str,
    /// NAA designator, 8 bytes.
    pub naa: u64,
    pub thin: bool,
    pub block_size: u32,
    pub max_transfer_blocks: u32,
    /// One pool chunk: the largest single volume I/O.
    pub optimal_transfer_blocks: u32,
    pub max_unmap_lba_count: u32,
    pub max_unmap_descriptors: u32,
    pub max_write_same_blocks: u64,
    pub max_compare_and_write_blocks: u8,
}

fn padded(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .map(|b| if (0x20..0x7f).contains(&b) { b } else { b' ' })
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// Standard INQUIRY data, 96 bytes.
pub fn standard(f: &InquiryFacts<'_>) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // connected, direct access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = 91;
    d[5] = 0x10; // TPGS = 01b (implicit ALUA), 3PC = 0, PROTECT = 0
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&padded(f.vendor, 8));
    d[16..32].copy_from_slice(&padded(f.product, 16));
    d[32..36].copy_from_slice(&padded(f.revision, 4));
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn vpd(code: u8, body: &[u8]) -> Vec<u8> {
    let mut d = vec![0, code];
    d.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    d.extend_from_slice(body);
    d
}

fn designator(proto_codeset: u8, piv_assoc_type: u8, id: &[u8]) -> Vec<u8> {
    let mut d = vec![
        proto_codeset,
        piv_assoc_type,
        0,
        u8::try_from(id.len()).unwrap_or(0),
    ];
    d.extend_from_slice(id);
    d
}

/// A SCSI name string designator value: NUL terminated, padded to 4.
fn name_string(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(251).collect();
    v.push(0);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

/// A VPD page, or `None` if unsupported.
pub fn vpd_page(code: u8, f: &InquiryFacts<'_>, nexus: &Nexus) -> Option<Vec<u8>> {
    Some(match code {
        VPD_SUPPORTED => vpd(
            code,
            &[
                VPD_SUPPORTED,
                VPD_SERIAL,
                VPD_DEVICE_ID,
                VPD_BLOCK_LIMITS,
                VPD_BLOCK_CHARACTERISTICS,
                VPD_LBP,
            ],
        ),
        VPD_SERIAL => vpd(code, &padded(f.serial, f.serial.len().clamp(1, 252))),
        VPD_DEVICE_ID => {
            let mut b = Vec::new();
            // NAA, logical unit, binary.
            b.extend(designator(0x01, 0x03, &f.naa.to_be_bytes()));
            // T10 vendor ID, logical unit, ASCII: vendor + serial.
            let mut t10 = padded(f.vendor, 8);
            t10.extend(
                f.serial
                    .bytes()
                    .filter(|c| (0x21..0x7f).contains(c))
                    .take(200),
            );
            b.extend(designator(0x02, 0x01, &t10));
            // Relative target port, target port association, iSCSI, PIV.
            let mut rp = vec![0, 0];
            rp.extend_from_slice(&nexus.relative_port.to_be_bytes());
            b.extend(designator(0x51, 0x94, &rp));
            // Target port group.
            let mut tpg = vec![0, 0];
            tpg.extend_from_slice(&TARGET_PORT_GROUP.to_be_bytes());
            b.extend(designator(0x51, 0x95, &tpg));
            // SCSI name string of the target port (UTF-8).
            b.extend(designator(0x53, 0x98, &name_string(&nexus.target_port)));
            // SCSI name string of the target device.
            let target = nexus
                .target_port
                .split(",t,")
                .next()
                .unwrap_or(&nexus.target_port);
            b.extend(designator(0x53, 0xa8, &name_string(target)));
            vpd(code, &b)
        }
        VPD_BLOCK_LIMITS => {
            let mut b = vec![0u8; 0x3c];
            // WSNZ = 0: WRITE SAME with 0 blocks writes to the end.
            b[1] = f.max_compare_and_write_blocks;
            let gran = u16::try_from((4096 / f.block_size.max(1)).max(1)).unwrap_or(1);
            b[2..4].copy_from_slice(&gran.to_be_bytes());
            b[4..8].copy_from_slice(&f.max_transfer_blocks.to_be_bytes());
            b[8..12].copy_from_slice(&f.optimal_transfer_blocks.to_be_bytes());
            if f.thin {
                b[16..20].copy_from_slice(&f.max_unmap_lba_count.to_be_bytes());
                b[20..24].copy_from_slice(&f.max_unmap_descriptors.to_be_bytes());
                b[24..28].copy_from_slice(&u32::from(gran).to_be_bytes());
                // UGAVALID with alignment 0.
                b[28] = 0x80;
            }
            b[32..40].copy_from_slice(&f.max_write_same_blocks.to_be_bytes());
            vpd(code, &b)
        }
        VPD_BLOCK_CHARACTERISTICS => {
            let mut b = vec![0u8; 0x3c];
            b[1] = 0x01; // non-rotating medium
            vpd(code, &b)
        }
        VPD_LBP => {
            // LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type thin (or full).
            let b = if f.thin {
                [0, 0xe4, 0x02, 0]
            } else {
                [0, 0x00, 0x00, 0]
            };
            vpd(code, &b)
        }
        _ => return None,
    })
}

/// INQUIRY: the data to return (before allocation-length truncation).
pub fn inquiry(c: &Cdb<'_>, f: &InquiryFacts<'_>, nexus: &Nexus) -> Result<Vec<u8>, Fail> {
    c.check_len(6)?;
    let evpd = c.bit(1, 0);
    if c.u8(1) & 0xfe != 0 {
        return Err(Sense::invalid_field_in_cdb(1, Some(1)).into());
    }
    let code = c.u8(2);
    if !evpd {
        if code != 0 {
            return Err(Sense::invalid_field_in_cdb(2, None).into());
        }
        return Ok(standard(f));
    }
    vpd_page(code, f, nexus).ok_or_else(|| Sense::invalid_field_in_cdb(2, None).into())
}

/// The NAA designator derived from a volume UUID: NAA 3h (locally
/// assigned) followed by the first 60 bits of the UUID.
pub fn naa_from_uuid(uuid: &str) -> u64 {
    let hex: String = uuid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(15)
        .collect();
    let v = u64::from_str_radix(&hex, 16).unwrap_or(0);
    (3u64 << 60) | (v & ((1u64 << 60) - 1))
}
