//! Log page builders and Get Log Page slicing: Error Information (01h),
//! SMART / Health Information (02h), Changed Namespace List (04h) and the
//! Discovery log (70h).
//!
//! Builders produce the whole page image from typed inputs; the Get Log Page
//! command then asks for a window of it (LPOL/LPOU offset, NUMDL/NUMDU
//! length). Keeping "build the page" and "cut the window" apart means every
//! page gets the same, single, tested offset/length logic — and the discovery
//! log's generation counter stays consistent across the several windows a
//! host reads.

use super::spec::{CntlId, CommandId, Nqn, Nsid, Sqe, Status, NQN_FIELD_LEN};
use super::wire::{
    put_ascii_nul_padded, put_ascii_space_padded, put_bytes, put_u16, put_u32, put_u64, put_u8,
};
use crate::units::Lba;

/// Log page identifiers.
pub mod lid {
    /// Error Information.
    pub const ERROR_INFORMATION: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Changed Namespace List.
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    /// Commands Supported and Effects.
    pub const COMMAND_EFFECTS: u8 = 0x05;
    /// Asymmetric Namespace Access.
    pub const ANA: u8 = 0x0c;
    /// Discovery (discovery controllers only).
    pub const DISCOVERY: u8 = 0x70;
}

/// A decoded Get Log Page command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GetLogPage {
    /// Command identifier.
    pub cid: CommandId,
    /// NSID.
    pub nsid: Nsid,
    /// Log page identifier (CDW10 7:0).
    pub lid: u8,
    /// Log specific field (CDW10 14:8).
    pub lsp: u8,
    /// Retain asynchronous event (CDW10 bit 15).
    pub rae: bool,
    /// Number of dwords to return (NUMDU:NUMDL + 1).
    pub numd: u64,
    /// Byte offset into the log (LPOU:LPOL).
    pub offset: u64,
    /// Log specific identifier (CDW11 31:16).
    pub lsi: u16,
}

impl GetLogPage {
    /// Reads the Get Log Page fields of an SQE.
    pub fn from_sqe(sqe: &Sqe) -> GetLogPage {
        let cdw10 = sqe.cdw10_plus(0);
        let cdw11 = sqe.cdw10_plus(1);
        let numd0 = u64::from(cdw10 >> 16) | (u64::from(cdw11 & 0xffff) << 16);
        GetLogPage {
            cid: sqe.cid,
            nsid: sqe.nsid,
            lid: (cdw10 & 0xff) as u8,
            lsp: ((cdw10 >> 8) & 0x7f) as u8,
            rae: cdw10 & (1 << 15) != 0,
            numd: numd0 + 1,
            offset: u64::from(sqe.cdw10_plus(2)) | (u64::from(sqe.cdw10_plus(3)) << 32),
            lsi: (cdw11 >> 16) as u16,
        }
    }

    /// Writes the fields into an SQE (for an initiator). `numd` must be >= 1.
    pub fn fill_sqe(&self, sqe: &mut Sqe) {
        let numd0 = self.numd.saturating_sub(1);
        sqe.cid = self.cid;
        sqe.nsid = self.nsid;
        sqe.cdw[0] = u32::from(self.lid)
            | (u32::from(self.lsp & 0x7f) << 8)
            | (u32::from(self.rae) << 15)
            | (((numd0 & 0xffff) as u32) << 16);
        sqe.cdw[1] = ((numd0 >> 16) & 0xffff) as u32 | (u32::from(self.lsi) << 16);
        sqe.cdw[2] = self.offset as u32;
        sqe.cdw[3] = (self.offset >> 32) as u32;
    }

    /// Bytes requested.
    pub fn byte_len(&self) -> u64 {
        self.numd.saturating_mul(4)
    }
}

/// Cuts the window a Get Log Page asks for out of a whole page image.
///
/// The result is exactly `numd * 4` bytes, zero filled past the end of the
/// page. An offset that is not dword aligned or lies beyond the page, or a
/// window larger than `max_transfer` (the command's data buffer), is refused
/// with Invalid Field so the host never gets a short transfer.
pub fn slice_log(page: &[u8], cmd: &GetLogPage, max_transfer: u32) -> Result<Vec<u8>, Status> {
    if cmd.offset % 4 != 0 || cmd.offset > page.len() as u64 {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    let len = cmd.byte_len();
    if len > u64::from(max_transfer) {
        return Err(Status::INVALID_FIELD.with_dnr());
    }
    let len = usize::try_from(len).map_err(|_| Status::INVALID_FIELD.with_dnr())?;
    let start = usize::try_from(cmd.offset).map_err(|_| Status::INVALID_FIELD.with_dnr())?;
    let mut out = vec![0u8; len];
    let avail = page.get(start..).unwrap_or(&[]);
    let n = avail.len().min(len);
    if let (Some(dst), Some(src)) = (out.get_mut(..n), avail.get(..n)) {
        dst.copy_from_slice(src);
    }
    Ok(out)
}

/// Size of an Error Information log entry.
pub const ERROR_ENTRY_LEN: usize = 64;

/// One Error Information log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorEntry {
    /// Unique, increasing error count (0 marks an invalid entry).
    pub error_count: u64,
    /// Submission queue of the failed command.
    pub sqid: u16,
    /// The failed command.
    pub cid: CommandId,
    /// Its completion status.
    pub status: Status,
    /// Parameter error location (byte in bits 7:0, bit in 10:8); FFFFh if n/a.
    pub param_error_location: u16,
    /// First LBA that hit the error.
    pub lba: Lba,
    /// Namespace.
    pub nsid: Nsid,
    /// Transport type (3 = TCP).
    pub trtype: u8,
    /// Command specific information.
    pub command_specific: u64,
}

impl ErrorEntry {
    /// Encodes the 64-byte entry.
    pub fn encode(&self) -> [u8; ERROR_ENTRY_LEN] {
        let mut b = [0u8; ERROR_ENTRY_LEN];
        put_u64(&mut b, 0, self.error_count);
        put_u16(&mut b, 8, self.sqid);
        put_u16(&mut b, 10, self.cid.0);
        put_u16(&mut b, 12, self.status.to_field(false));
        put_u16(&mut b, 14, self.param_error_location);
        put_u64(&mut b, 16, self.lba.0);
        put_u32(&mut b, 24, self.nsid.0);
        put_u8(&mut b, 29, self.trtype);
        put_u64(&mut b, 32, self.command_specific);
        b
    }
}

/// The Error Information log with `entries` newest first, padded with
/// zeroed (invalid) entries up to `elpe + 1` entries.
pub fn error_log(entries: &[ErrorEntry], elpe: u8) -> Vec<u8> {
    let n = usize::from(elpe) + 1;
    let mut b = vec![0u8; n * ERROR_ENTRY_LEN];
    for (i, e) in entries.iter().take(n).enumerate() {
        put_bytes(&mut b, i * ERROR_ENTRY_LEN, &e.encode());
    }
    b
}

/// Size of the SMART / Health Information log.
pub const SMART_LEN: usize = 512;

/// SMART / Health Information contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmartLog {
    /// Critical warning bits.
    pub critical_warning: u8,
    /// Composite temperature in kelvin.
    pub temperature_kelvin: u16,
    /// Available spare, percent.
    pub available_spare: u8,
    /// Available spare threshold, percent.
    pub spare_threshold: u8,
    /// Percentage used.
    pub percent_used: u8,
    /// Data units read, in thousands of 512-byte units (rounded up).
    pub data_units_read: u128,
    /// Data units written, likewise.
    pub data_units_written: u128,
    /// Host read commands.
    pub host_reads: u128,
    /// Host write commands.
    pub host_writes: u128,
    /// Controller busy time, minutes.
    pub busy_minutes: u128,
    /// Power cycles.
    pub power_cycles: u128,
    /// Power-on hours.
    pub power_on_hours: u128,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and data integrity errors.
    pub media_errors: u128,
    /// Error information log entries over the controller's life.
    pub error_log_entries: u128,
}

impl SmartLog {
    /// Converts a byte count to SMART data units (1000 x 512 bytes, rounded up).
    pub fn data_units(bytes: u64) -> u128 {
        u128::from(bytes).div_ceil(512_000)
    }

    /// Encodes the 512-byte page.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SMART_LEN];
        put_u8(&mut b, 0, self.critical_warning);
        put_u16(&mut b, 1, self.temperature_kelvin);
        put_u8(&mut b, 3, self.available_spare);
        put_u8(&mut b, 4, self.spare_threshold);
        put_u8(&mut b, 5, self.percent_used);
        let wide = [
            self.data_units_read,
            self.data_units_written,
            self.host_reads,
            self.host_writes,
            self.busy_minutes,
            self.power_cycles,
            self.power_on_hours,
            self.unsafe_shutdowns,
            self.media_errors,
            self.error_log_entries,
        ];
        for (i, v) in wide.iter().enumerate() {
            put_bytes(&mut b, 32 + 16 * i, &v.to_le_bytes());
        }
        b
    }
}

/// Size of the Changed Namespace List log.
pub const CHANGED_NS_LEN: usize = 4096;

/// The Changed Namespace List: up to 1024 NSIDs; more than that is reported
/// as a single FFFFFFFFh entry.
pub fn changed_ns_list(changed: &[Nsid]) -> Vec<u8> {
    let mut b = vec![0u8; CHANGED_NS_LEN];
    if changed.len() > CHANGED_NS_LEN / 4 {
        put_u32(&mut b, 0, 0xffff_ffff);
    } else {
        for (i, n) in changed.iter().enumerate() {
            put_u32(&mut b, i * 4, n.0);
        }
    }
    b
}

/// Transport types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TrType {
    /// RDMA.
    Rdma = 1,
    /// Fibre Channel.
    Fc = 2,
    /// TCP.
    Tcp = 3,
    /// Intra-host loopback.
    Loop = 254,
}

/// Address families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AdrFam {
    /// IPv4.
    Ipv4 = 1,
    /// IPv6.
    Ipv6 = 2,
    /// InfiniBand.
    Ib = 3,
    /// Fibre Channel.
    Fc = 4,
    /// Intra-host.
    Loop = 254,
}

/// Discovery entry subsystem types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SubType {
    /// A referral to another discovery service.
    Discovery = 1,
    /// An NVM subsystem.
    Nvme = 2,
    /// The discovery subsystem being queried.
    CurrentDiscovery = 3,
}

/// TREQ secure channel values (bits 1:0) and flags.
pub mod treq {
    /// Secure channel requirement not specified.
    pub const NOT_SPECIFIED: u8 = 0;
    /// Secure channel required.
    pub const REQUIRED: u8 = 1;
    /// Secure channel not required.
    pub const NOT_REQUIRED: u8 = 2;
    /// SQ flow control disable supported (bit 2).
    pub const DISABLE_SQFLOW: u8 = 1 << 2;
}

/// Discovery log entry byte offsets.
pub mod disc_off {
    /// Transport type.
    pub const TRTYPE: usize = 0;
    /// Address family.
    pub const ADRFAM: usize = 1;
    /// Subsystem type.
    pub const SUBTYPE: usize = 2;
    /// Transport requirements.
    pub const TREQ: usize = 3;
    /// Port ID.
    pub const PORTID: usize = 4;
    /// Controller ID.
    pub const CNTLID: usize = 6;
    /// Admin max SQ size.
    pub const ASQSZ: usize = 8;
    /// Entry flags.
    pub const EFLAGS: usize = 10;
    /// Transport service identifier (32 bytes).
    pub const TRSVCID: usize = 32;
    /// Subsystem NQN (256 bytes).
    pub const SUBNQN: usize = 256;
    /// Transport address (256 bytes).
    pub const TRADDR: usize = 512;
    /// Transport specific address subtype (256 bytes).
    pub const TSAS: usize = 768;
}

/// Discovery log header and entry size.
pub const DISCOVERY_RECORD_LEN: usize = 1024;

/// Why a discovery entry could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// TRSVCID must be printable ASCII of at most 32 bytes.
    #[error("TRSVCID is not printable ASCII of at most 32 bytes")]
    BadTrsvcid,
    /// TRADDR must be printable ASCII of at most 256 bytes.
    #[error("TRADDR is not printable ASCII of at most 256 bytes")]
    BadTraddr,
}

/// One discovery log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryEntry {
    /// Transport type.
    pub trtype: TrType,
    /// Address family.
    pub adrfam: AdrFam,
    /// Subsystem type.
    pub subtype: SubType,
    /// Transport requirements (see [`treq`]).
    pub treq: u8,
    /// NVM subsystem port.
    pub portid: u16,
    /// Controller ID (FFFFh: dynamic controller model).
    pub cntlid: CntlId,
    /// Admin max SQ size (>= 32).
    pub asqsz: u16,
    /// Entry flags.
    pub eflags: u16,
    /// Service ID: the TCP port as text.
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: Nqn,
    /// Transport address: the IP address as text.
    pub traddr: String,
    /// TCP security type (TSAS byte 0): 0 none.
    pub sectype: u8,
}

fn printable(s: &str, max: usize) -> bool {
    s.len() <= max && s.bytes().all(|c| (0x20..=0x7e).contains(&c))
}

impl DiscoveryEntry {
    /// An NVMe/TCP IPv4 entry for an NVM subsystem, dynamic controllers.
    pub fn tcp_ipv4(subnqn: Nqn, traddr: &str, port: u16, portid: u16) -> DiscoveryEntry {
        DiscoveryEntry {
            trtype: TrType::Tcp,
            adrfam: AdrFam::Ipv4,
            subtype: SubType::Nvme,
            treq: treq::NOT_SPECIFIED,
            portid,
            cntlid: CntlId::DYNAMIC,
            asqsz: 32,
            eflags: 0,
            trsvcid: port.to_string(),
            subnqn,
            traddr: traddr.to_owned(),
            sectype: 0,
        }
    }

    /// Encodes the 1024-byte entry. TRSVCID and TRADDR are ASCII strings
    /// padded with spaces; SUBNQN is NUL padded.
    pub fn encode(&self) -> Result<[u8; DISCOVERY_RECORD_LEN], DiscoveryError> {
        use disc_off as o;
        if !printable(&self.trsvcid, 32) {
            return Err(DiscoveryError::BadTrsvcid);
        }
        if !printable(&self.traddr, 256) {
            return Err(DiscoveryError::BadTraddr);
        }
        let mut b = [0u8; DISCOVERY_RECORD_LEN];
        put_u8(&mut b, o::TRTYPE, self.trtype as u8);
        put_u8(&mut b, o::ADRFAM, self.adrfam as u8);
        put_u8(&mut b, o::SUBTYPE, self.subtype as u8);
        put_u8(&mut b, o::TREQ, self.treq);
        put_u16(&mut b, o::PORTID, self.portid);
        put_u16(&mut b, o::CNTLID, self.cntlid.0);
        put_u16(&mut b, o::ASQSZ, self.asqsz);
        put_u16(&mut b, o::EFLAGS, self.eflags);
        put_ascii_space_padded(&mut b, o::TRSVCID, 32, &self.trsvcid);
        put_ascii_nul_padded(&mut b, o::SUBNQN, NQN_FIELD_LEN, self.subnqn.as_str());
        put_ascii_space_padded(&mut b, o::TRADDR, 256, &self.traddr);
        put_u8(&mut b, o::TSAS, self.sectype);
        Ok(b)
    }
}

/// The whole discovery log: 1024-byte header (GENCTR, NUMREC, RECFMT 0)
/// followed by one 1024-byte record per entry. Slice it with [`slice_log`].
pub fn discovery_log(genctr: u64, entries: &[DiscoveryEntry]) -> Result<Vec<u8>, DiscoveryError> {
    let mut b = vec![0u8; DISCOVERY_RECORD_LEN * (entries.len() + 1)];
    put_u64(&mut b, 0, genctr);
    put_u64(&mut b, 8, entries.len() as u64);
    put_u16(&mut b, 16, 0);
    for (i, e) in entries.iter().enumerate() {
        put_bytes(&mut b, DISCOVERY_RECORD_LEN * (i + 1), &e.encode()?);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::spec::{DataSgl, Sqe};
    use proptest::prelude::*;

    fn nqn() -> Nqn {
        Nqn::new("nqn.2024-01.io.mirrorpoint:vol0").unwrap()
    }

    #[test]
    fn get_log_page_fields() {
        let cmd = GetLogPage {
            cid: CommandId(1),
            nsid: Nsid(0),
            lid: lid::DISCOVERY,
            lsp: 0,
            rae: true,
            numd: 0x1_0001,
            offset: 0x1_0000_0400,
            lsi: 0,
        };
        let mut sqe = Sqe::new(0x02, CommandId(0), Nsid(0), DataSgl::Transport { len: 0 });
        cmd.fill_sqe(&mut sqe);
        // NUMDL = 0 (low 16 of 0x10000), NUMDU = 1.
        assert_eq!(sqe.cdw[0], 0x70 | (1 << 15));
        assert_eq!(sqe.cdw[1] & 0xffff, 1);
        assert_eq!(sqe.cdw[2], 0x400);
        assert_eq!(sqe.cdw[3], 1);
        assert_eq!(GetLogPage::from_sqe(&sqe), cmd);
        assert_eq!(cmd.byte_len(), 0x1_0001 * 4);
    }

    fn glp(offset: u64, numd: u64) -> GetLogPage {
        GetLogPage {
            cid: CommandId(1),
            nsid: Nsid(0),
            lid: lid::DISCOVERY,
            lsp: 0,
            rae: false,
            numd,
            offset,
            lsi: 0,
        }
    }

    #[test]
    fn slicing() {
        let page: Vec<u8> = (0..100u8).collect();
        assert_eq!(
            slice_log(&page, &glp(0, 4), 4096).unwrap(),
            (0..16u8).collect::<Vec<_>>()
        );
        let tail = slice_log(&page, &glp(96, 4), 4096).unwrap();
        assert_eq!(&tail[..4], &[96, 97, 98, 99]);
        assert_eq!(&tail[4..], &[0; 12]);
        assert_eq!(slice_log(&page, &glp(100, 1), 4096).unwrap(), vec![0; 4]);
        assert_eq!(
            slice_log(&page, &glp(2, 1), 4096),
            Err(Status::INVALID_FIELD.with_dnr())
        );
        assert_eq!(
            slice_log(&page, &glp(104, 1), 4096),
            Err(Status::INVALID_FIELD.with_dnr())
        );
        assert!(slice_log(&page, &glp(0, 2048), 4096).is_err());
    }

    #[test]
    fn discovery_layout() {
        let mut e = DiscoveryEntry::tcp_ipv4(nqn(), "192.168.1.10", 4420, 1);
        e.treq = treq::NOT_REQUIRED;
        let log = discovery_log(7, &[e.clone(), e]).unwrap();
        assert_eq!(log.len(), 3072);
        assert_eq!(&log[0..8], &7u64.to_le_bytes());
        assert_eq!(&log[8..16], &2u64.to_le_bytes());
        let r = &log[1024..2048];
        assert_eq!(&r[0..4], &[3, 1, 2, 2]);
        assert_eq!(&r[4..6], &[1, 0]);
        assert_eq!(&r[6..8], &[0xff, 0xff]);
        assert_eq!(&r[8..10], &[32, 0]);
        assert_eq!(&r[32..36], b"4420");
        assert_eq!(r[36], b' ');
        assert_eq!(&r[256..287], nqn().as_str().as_bytes());
        assert_eq!(r[287], 0);
        assert_eq!(&r[512..524], b"192.168.1.10");
        assert_eq!(r[524], b' ');
        assert_eq!(r[768], 0);
        // A host reading header then entries gets consistent slices.
        let hdr = slice_log(&log, &glp(0, 4), 4096).unwrap();
        assert_eq!(&hdr[..8], &7u64.to_le_bytes());
        let second = slice_log(&log, &glp(2048, 256), 4096).unwrap();
        assert_eq!(&second[..], &log[2048..3072]);
        let bad = DiscoveryEntry {
            traddr: "é".into(),
            ..DiscoveryEntry::tcp_ipv4(nqn(), "x", 1, 1)
        };
        assert_eq!(bad.encode(), Err(DiscoveryError::BadTraddr));
    }

    #[test]
    fn error_and_smart_and_changed() {
        let e = ErrorEntry {
            error_count: 5,
            sqid: 1,
            cid: CommandId(0x10),
            status: Status::LBA_OUT_OF_RANGE.with_dnr(),
            param_error_location: 0xffff,
            lba: Lba(0x1234),
            nsid: Nsid(1),
            trtype: TrType::Tcp as u8,
            command_specific: 0,
        };
        let log = error_log(&[e], 3);
        assert_eq!(log.len(), 256);
        assert_eq!(&log[0..8], &5u64.to_le_bytes());
        assert_eq!(&log[10..12], &[0x10, 0]);
        assert_eq!(u16::from_le_bytes([log[12], log[13]]), (0x80 << 1) | 0x8000);
        assert_eq!(&log[16..24], &0x1234u64.to_le_bytes());
        assert_eq!(log[29], 3);
        assert!(log[64..].iter().all(|&x| x == 0));

        let s = SmartLog {
            temperature_kelvin: 300,
            available_spare: 100,
            data_units_read: SmartLog::data_units(512_001),
            host_writes: 9,
            ..SmartLog::default()
        };
        let b = s.encode();
        assert_eq!(b.len(), 512);
        assert_eq!(&b[1..3], &300u16.to_le_bytes());
        assert_eq!(b[3], 100);
        assert_eq!(&b[32..48], &2u128.to_le_bytes());
        assert_eq!(&b[80..96], &9u128.to_le_bytes());

        let c = changed_ns_list(&[Nsid(2), Nsid(5)]);
        assert_eq!(&c[..12], &[2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        let many: Vec<Nsid> = (1..=1025).map(Nsid).collect();
        let c = changed_ns_list(&many);
        assert_eq!(&c[..8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }

    proptest! {
        #[test]
        fn slice_never_panics(len in 0usize..5000, off in any::<u64>(), numd in 1u64..(1 << 32)) {
            let page = vec![1u8; len];
            if let Ok(v) = slice_log(&page, &glp(off, numd), 1 << 20) {
                prop_assert_eq!(v.len() as u64, numd * 4);
            }
        }

        #[test]
        fn glp_sqe_round_trip(b in proptest::collection::vec(any::<u8>(), 64)) {
            let sqe = Sqe::decode(&b).unwrap();
            let g = GetLogPage::from_sqe(&sqe);
            let mut s2 = sqe;
            g.fill_sqe(&mut s2);
            // Bit 7 of LSP (CDW10 bit 15 is RAE; LSP is 14:8) is covered; all
            // of CDW10-13 round trip.
            prop_assert_eq!(GetLogPage::from_sqe(&s2), g);
        }
    }
}
