//! Decoders for the data structures an initiator reads: Identify Controller,
//! Identify Namespace, the active namespace ID list and the Discovery log.
//!
//! The target side (`identify`, `log_page`) only builds these images; the
//! host needs the reverse. Decoding reuses the target side's field offsets
//! so both directions agree on the layout by construction, reads through the
//! bounds-checked `wire` helpers (a short or hostile buffer yields zeroes,
//! never a panic), and rejects only what would make the result unusable
//! (an LBA format the initiator cannot address).

use crate::nvmf::identify::{ctrl_off, ns_off, IDENTIFY_LEN};
use crate::nvmf::log_page::{disc_off, DISCOVERY_RECORD_LEN};
use crate::nvmf::wire::{bytes, u16_at, u32_at, u64_at, u8_at};
use crate::units::BlockSize;

/// Trims an ASCII field padded with spaces or NULs; non-ASCII bytes become '?'.
fn text(b: &[u8], off: usize, width: usize) -> String {
    let field = b.get(off..off.saturating_add(width)).unwrap_or(&[]);
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    field[..end]
        .iter()
        .map(|&c| {
            if (0x20..=0x7e).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// Identify Controller fields an initiator uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControllerData {
    /// PCI vendor ID.
    pub vid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum data transfer size, as a power of two of the minimum page
    /// size (4 KiB here); 0 = no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version.
    pub ver: u32,
    /// Controller type (1 I/O, 2 discovery, 3 admin; 0 not reported).
    pub cntrltype: u8,
    /// Keep alive granularity in 100 ms units.
    pub kas: u16,
    /// Maximum outstanding commands (0 = not reported).
    pub maxcmd: u16,
    /// Number of namespaces (largest NSID).
    pub nn: u32,
    /// Optional NVM commands supported.
    pub oncs: u16,
    /// Volatile write cache.
    pub vwc: u8,
    /// SGL support.
    pub sgls: u32,
    /// Subsystem NQN.
    pub subnqn: String,
    /// I/O queue command capsule size, 16-byte units (SQE included).
    pub ioccsz: u32,
    /// I/O queue response capsule size, 16-byte units.
    pub iorcsz: u32,
    /// In-capsule data offset, 16-byte units.
    pub icdoff: u16,
    /// Maximum SGL data block descriptors.
    pub msdbd: u8,
}

impl ControllerData {
    /// Decodes a 4096-byte Identify Controller image.
    pub fn decode(b: &[u8]) -> ControllerData {
        use ctrl_off as o;
        ControllerData {
            vid: u16_at(b, o::VID),
            serial: text(b, o::SN, 20),
            model: text(b, o::MN, 40),
            firmware: text(b, o::FR, 8),
            mdts: u8_at(b, o::MDTS),
            cntlid: u16_at(b, o::CNTLID),
            ver: u32_at(b, o::VER),
            cntrltype: u8_at(b, o::CNTRLTYPE),
            kas: u16_at(b, o::KAS),
            maxcmd: u16_at(b, o::MAXCMD),
            nn: u32_at(b, o::NN),
            oncs: u16_at(b, o::ONCS),
            vwc: u8_at(b, o::VWC),
            sgls: u32_at(b, o::SGLS),
            subnqn: text(b, o::SUBNQN, 256),
            ioccsz: u32_at(b, o::IOCCSZ),
            iorcsz: u32_at(b, o::IORCSZ),
            icdoff: u16_at(b, o::ICDOFF),
            msdbd: u8_at(b, o::MSDBD),
        }
    }

    /// In-capsule data bytes an I/O queue accepts (IOCCSZ minus the SQE),
    /// or 0 when in-capsule data needs an offset this initiator does not use.
    pub fn in_capsule_data(&self) -> u32 {
        if self.icdoff != 0 {
            return 0;
        }
        self.ioccsz.saturating_mul(16).saturating_sub(64)
    }

    /// Largest transfer of one command in bytes (`None` = no limit),
    /// assuming CAP.MPSMIN of 4 KiB as every fabrics controller reports.
    pub fn max_transfer(&self) -> Option<u64> {
        match self.mdts {
            0 => None,
            m => 4096u64.checked_shl(u32::from(m)),
        }
    }
}

/// Why an Identify Namespace image is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceDataError {
    /// All zeroes: the NSID is not active.
    #[error("namespace is not active")]
    Inactive,
    /// The formatted LBA size is not a power of two from 512 B to 64 KiB,
    /// or it carries metadata.
    #[error("unsupported LBA format: LBADS {lbads}, metadata {ms} bytes")]
    UnsupportedFormat {
        /// log2 of the block size.
        lbads: u8,
        /// Metadata bytes per block.
        ms: u16,
    },
}

/// Identify Namespace fields an initiator uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceData {
    /// Size in blocks.
    pub nsze: u64,
    /// Capacity in blocks.
    pub ncap: u64,
    /// Blocks in use.
    pub nuse: u64,
    /// Namespace features.
    pub nsfeat: u8,
    /// Formatted LBA size index.
    pub flbas: u8,
    /// Logical block size.
    pub block_size: BlockSize,
    /// Multi-path capabilities.
    pub nmic: u8,
    /// Deallocate features.
    pub dlfeat: u8,
    /// Namespace GUID.
    pub nguid: [u8; 16],
    /// EUI-64.
    pub eui64: [u8; 8],
}

impl NamespaceData {
    /// Decodes a 4096-byte Identify Namespace image.
    pub fn decode(b: &[u8]) -> Result<NamespaceData, NamespaceDataError> {
        use ns_off as o;
        let nsze = u64_at(b, o::NSZE);
        if nsze == 0 {
            return Err(NamespaceDataError::Inactive);
        }
        let flbas_raw = u8_at(b, o::FLBAS);
        // FLBAS bits 3:0 plus bits 6:5 as the upper bits (more than 16 formats).
        let flbas = (flbas_raw & 0xf) | ((flbas_raw >> 5 & 0x3) << 4);
        let lbaf = u32_at(b, o::LBAF0 + 4 * usize::from(flbas));
        let ms = (lbaf & 0xffff) as u16;
        let lbads = ((lbaf >> 16) & 0xff) as u8;
        let block_size = (9..=16)
            .contains(&lbads)
            .then(|| BlockSize::new(1u32 << lbads).ok())
            .flatten()
            .filter(|_| ms == 0)
            .ok_or(NamespaceDataError::UnsupportedFormat { lbads, ms })?;
        Ok(NamespaceData {
            nsze,
            ncap: u64_at(b, o::NCAP),
            nuse: u64_at(b, o::NUSE),
            nsfeat: u8_at(b, o::NSFEAT),
            flbas,
            block_size,
            nmic: u8_at(b, o::NMIC),
            dlfeat: u8_at(b, o::DLFEAT),
            nguid: bytes(b, o::NGUID).unwrap_or([0; 16]),
            eui64: bytes(b, o::EUI64).unwrap_or([0; 8]),
        })
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.nsze.saturating_mul(u64::from(self.block_size.bytes()))
    }
}

/// Decodes an active namespace ID list (CNS 02h): the non-zero IDs in order.
pub fn ns_list(b: &[u8]) -> Vec<u32> {
    (0..IDENTIFY_LEN / 4)
        .map(|i| u32_at(b, 4 * i))
        .take_while(|&n| n != 0)
        .collect()
}

/// One Discovery log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryLogEntry {
    /// Transport type (3 = TCP).
    pub trtype: u8,
    /// Address family (1 = IPv4).
    pub adrfam: u8,
    /// Subsystem type (1 referral, 2 NVM, 3 current discovery).
    pub subtype: u8,
    /// Transport requirements.
    pub treq: u8,
    /// Port ID.
    pub portid: u16,
    /// Controller ID.
    pub cntlid: u16,
    /// Admin max SQ size.
    pub asqsz: u16,
    /// Entry flags.
    pub eflags: u16,
    /// Transport service ID (the TCP port).
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Transport address.
    pub traddr: String,
    /// TCP security type.
    pub sectype: u8,
}

impl DiscoveryLogEntry {
    /// Decodes one 1024-byte record.
    pub fn decode(b: &[u8]) -> DiscoveryLogEntry {
        use disc_off as o;
        DiscoveryLogEntry {
            trtype: u8_at(b, o::TRTYPE),
            adrfam: u8_at(b, o::ADRFAM),
            subtype: u8_at(b, o::SUBTYPE),
            treq: u8_at(b, o::TREQ),
            portid: u16_at(b, o::PORTID),
            cntlid: u16_at(b, o::CNTLID),
            asqsz: u16_at(b, o::ASQSZ),
            eflags: u16_at(b, o::EFLAGS),
            trsvcid: text(b, o::TRSVCID, 32),
            subnqn: text(b, o::SUBNQN, 256),
            traddr: text(b, o::TRADDR, 256),
            sectype: u8_at(b, o::TSAS),
        }
    }
}

/// The Discovery log page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryLog {
    /// Generation counter.
    pub genctr: u64,
    /// The records.
    pub entries: Vec<DiscoveryLogEntry>,
}

/// The header fields: generation counter and number of records.
pub fn discovery_header(b: &[u8]) -> (u64, u64) {
    (u64_at(b, 0), u64_at(b, 8))
}

/// Decodes a whole discovery log image (header plus `numrec` records; a
/// short image yields only the records it holds).
pub fn discovery_log(b: &[u8]) -> DiscoveryLog {
    let (genctr, numrec) = discovery_header(b);
    let entries = b
        .chunks_exact(DISCOVERY_RECORD_LEN)
        .skip(1)
        .take(usize::try_from(numrec).unwrap_or(usize::MAX))
        .map(DiscoveryLogEntry::decode)
        .collect();
    DiscoveryLog { genctr, entries }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::identify::{active_ns_list, IdentifyController, IdentifyNamespace};
    use crate::nvmf::log_page::{discovery_log as build_log, DiscoveryEntry};
    use crate::nvmf::spec::{CntlId, Nqn, Nsid};
    use crate::units::ByteLen;
    use proptest::prelude::*;

    fn nqn() -> Nqn {
        Nqn::new("nqn.2024-01.io.mirrorpoint:vol0").unwrap()
    }

    #[test]
    fn identify_images_round_trip_through_the_target_builders() {
        let c = IdentifyController::tcp_io("SN1", "Model", "0.1", CntlId(7), nqn(), 4, 8192);
        let d = ControllerData::decode(&c.encode().unwrap());
        assert_eq!(d.serial, "SN1");
        assert_eq!(d.model, "Model");
        assert_eq!(d.cntlid, 7);
        assert_eq!(d.nn, 4);
        assert_eq!(d.subnqn, nqn().as_str());
        assert_eq!(d.in_capsule_data(), 8192);
        assert_eq!(d.max_transfer(), None);

        let n = IdentifyNamespace::new(ByteLen(1 << 20), BlockSize::B4096, [3; 16]);
        let nd = NamespaceData::decode(&n.encode()).unwrap();
        assert_eq!(nd.nsze, 256);
        assert_eq!(nd.block_size, BlockSize::B4096);
        assert_eq!(nd.nguid, [3; 16]);
        assert_eq!(nd.size_bytes(), 1 << 20);
        assert_eq!(
            NamespaceData::decode(&[0u8; 4096]),
            Err(NamespaceDataError::Inactive)
        );

        let l = active_ns_list(&[Nsid(3), Nsid(1), Nsid(9)], Nsid(0)).unwrap();
        assert_eq!(ns_list(&l), vec![1, 3, 9]);
    }

    #[test]
    fn discovery_log_round_trips() {
        let e = DiscoveryEntry::tcp_ipv4(nqn(), "127.0.0.1", 4420, 1);
        let img = build_log(5, &[e.clone(), e]).unwrap();
        let log = discovery_log(&img);
        assert_eq!(log.genctr, 5);
        assert_eq!(log.entries.len(), 2);
        assert_eq!(log.entries[0].trsvcid, "4420");
        assert_eq!(log.entries[0].traddr, "127.0.0.1");
        assert_eq!(log.entries[0].subnqn, nqn().as_str());
        assert_eq!(log.entries[0].trtype, 3);
        assert_eq!(log.entries[0].subtype, 2);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = ControllerData::decode(&b).in_capsule_data();
            let _ = NamespaceData::decode(&b);
            let _ = ns_list(&b);
            let _ = discovery_log(&b);
        }
    }
}
