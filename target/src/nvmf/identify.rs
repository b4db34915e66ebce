//! Identify data structure builders: Identify Controller (CNS 01h), Identify
//! Namespace (CNS 00h), the active namespace ID list (CNS 02h) and the
//! namespace identification descriptor list (CNS 03h), plus decoding of the
//! Identify command itself.
//!
//! The builders are pure functions from typed descriptions to the exact byte
//! images the host reads, so the controller logic decides *what* to report
//! and this module alone knows *where* each field lives. Only fields a
//! fabrics block target reports are modelled; everything else stays zero.

use super::spec::{CntlId, CommandId, Nqn, Nsid, Sqe, Status, NQN_FIELD_LEN};
use super::wire::{
    put_ascii_nul_padded, put_ascii_space_padded, put_bytes, put_u16, put_u32, put_u64, put_u8,
};
use crate::units::{BlockSize, ByteLen};

/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

/// CNS values handled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Cns {
    /// Identify Namespace.
    Namespace = 0x00,
    /// Identify Controller.
    Controller = 0x01,
    /// Active namespace ID list.
    ActiveNamespaces = 0x02,
    /// Namespace identification descriptor list.
    NamespaceDescriptors = 0x03,
}

/// A decoded Identify command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentifyCommand {
    /// Command identifier.
    pub cid: CommandId,
    /// NSID.
    pub nsid: Nsid,
    /// Controller or namespace structure (CDW10 bits 7:0), raw.
    pub cns: u8,
    /// Controller identifier (CDW10 bits 31:16).
    pub cntid: u16,
    /// Command set identifier (CDW11 bits 31:24).
    pub csi: u8,
}

impl IdentifyCommand {
    /// Reads the Identify fields of an SQE.
    pub fn from_sqe(sqe: &Sqe) -> IdentifyCommand {
        let cdw10 = sqe.cdw10_plus(0);
        IdentifyCommand {
            cid: sqe.cid,
            nsid: sqe.nsid,
            cns: (cdw10 & 0xff) as u8,
            cntid: (cdw10 >> 16) as u16,
            csi: (sqe.cdw10_plus(1) >> 24) as u8,
        }
    }

    /// The CNS, if one this module builds.
    pub fn cns(&self) -> Option<Cns> {
        match self.cns {
            0x00 => Some(Cns::Namespace),
            0x01 => Some(Cns::Controller),
            0x02 => Some(Cns::ActiveNamespaces),
            0x03 => Some(Cns::NamespaceDescriptors),
            _ => None,
        }
    }
}

/// Why an Identify structure could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentifyError {
    /// A text field holds a byte outside printable ASCII or is too long.
    #[error("field {0} must be printable ASCII that fits its width")]
    BadText(&'static str),
}

/// Controller type (CNTRLTYPE, byte 111).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ControllerType {
    /// I/O controller.
    Io = 1,
    /// Discovery controller.
    Discovery = 2,
    /// Administrative controller.
    Admin = 3,
}

/// ONCS bits.
pub mod oncs {
    /// Compare.
    pub const COMPARE: u16 = 1 << 0;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Dataset Management.
    pub const DSM: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// LPA bits.
pub mod lpa {
    /// SMART log per namespace.
    pub const SMART_PER_NS: u8 = 1 << 0;
    /// Commands Supported and Effects log.
    pub const CMD_EFFECTS: u8 = 1 << 1;
    /// Extended data for Get Log Page (NUMDU, LPOL/LPOU).
    pub const EXTENDED_DATA: u8 = 1 << 2;
}

/// SGLS bits.
pub mod sgls {
    /// SGLs supported, no alignment or granularity requirement.
    pub const SUPPORTED: u32 = 1 << 0;
    /// Keyed SGL data block supported (RDMA only).
    pub const KEYED: u32 = 1 << 2;
    /// Address field of SGL data blocks may be an offset (in-capsule data).
    pub const OFFSET: u32 = 1 << 20;
}

/// Identify Controller byte offsets.
pub mod ctrl_off {
    /// PCI vendor ID.
    pub const VID: usize = 0;
    /// Subsystem vendor ID.
    pub const SSVID: usize = 2;
    /// Serial number (20 bytes).
    pub const SN: usize = 4;
    /// Model number (40 bytes).
    pub const MN: usize = 24;
    /// Firmware revision (8 bytes).
    pub const FR: usize = 64;
    /// Recommended arbitration burst.
    pub const RAB: usize = 72;
    /// IEEE OUI (3 bytes).
    pub const IEEE: usize = 73;
    /// Multi-path I/O and namespace sharing capabilities.
    pub const CMIC: usize = 76;
    /// Maximum data transfer size (2^n units of CAP.MPSMIN).
    pub const MDTS: usize = 77;
    /// Controller ID.
    pub const CNTLID: usize = 78;
    /// Version.
    pub const VER: usize = 80;
    /// Optional asynchronous events supported.
    pub const OAES: usize = 92;
    /// Controller attributes.
    pub const CTRATT: usize = 96;
    /// Controller type.
    pub const CNTRLTYPE: usize = 111;
    /// Optional admin command support.
    pub const OACS: usize = 256;
    /// Abort command limit.
    pub const ACL: usize = 258;
    /// Asynchronous event request limit.
    pub const AERL: usize = 259;
    /// Firmware updates.
    pub const FRMW: usize = 260;
    /// Log page attributes.
    pub const LPA: usize = 261;
    /// Error log page entries (0's based).
    pub const ELPE: usize = 262;
    /// Keep alive support (100 ms units).
    pub const KAS: usize = 320;
    /// SQ entry size.
    pub const SQES: usize = 512;
    /// CQ entry size.
    pub const CQES: usize = 513;
    /// Maximum outstanding commands.
    pub const MAXCMD: usize = 514;
    /// Number of namespaces.
    pub const NN: usize = 516;
    /// Optional NVM command support.
    pub const ONCS: usize = 520;
    /// Fused operation support.
    pub const FUSES: usize = 522;
    /// Volatile write cache.
    pub const VWC: usize = 525;
    /// SGL support.
    pub const SGLS: usize = 536;
    /// Subsystem NQN (256 bytes).
    pub const SUBNQN: usize = 768;
    /// I/O queue command capsule supported size (16-byte units).
    pub const IOCCSZ: usize = 1792;
    /// I/O queue response capsule supported size (16-byte units).
    pub const IORCSZ: usize = 1796;
    /// In capsule data offset (16-byte units).
    pub const ICDOFF: usize = 1800;
    /// Fabrics controller attributes.
    pub const FCATT: usize = 1802;
    /// Maximum SGL data block descriptors.
    pub const MSDBD: usize = 1803;
}

/// What an Identify Controller reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI vendor ID.
    pub vid: u16,
    /// PCI subsystem vendor ID.
    pub ssvid: u16,
    /// Serial number (ASCII, up to 20).
    pub serial: String,
    /// Model number (ASCII, up to 40).
    pub model: String,
    /// Firmware revision (ASCII, up to 8).
    pub firmware: String,
    /// IEEE OUI, as stored (least significant byte first).
    pub ieee_oui: [u8; 3],
    /// CMIC bits (bit 1: multiple controllers, bit 3: ANA).
    pub cmic: u8,
    /// Maximum data transfer size, 2^n pages of CAP.MPSMIN; 0 = no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: CntlId,
    /// Version (see [`super::spec::version`]).
    pub ver: u32,
    /// Optional asynchronous events supported (bit 8: namespace attribute notices).
    pub oaes: u32,
    /// Controller attributes.
    pub ctratt: u32,
    /// Controller type.
    pub cntrltype: ControllerType,
    /// Optional admin command support.
    pub oacs: u16,
    /// Abort command limit (0's based).
    pub acl: u8,
    /// Asynchronous event request limit (0's based).
    pub aerl: u8,
    /// Firmware updates.
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error log page entries (0's based).
    pub elpe: u8,
    /// Keep alive granularity in 100 ms units (0 = not supported).
    pub kas: u16,
    /// SQES: max (bits 7:4) and required (3:0) log2 entry sizes.
    pub sqes: u8,
    /// CQES, likewise.
    pub cqes: u8,
    /// Maximum outstanding commands per queue (must be non-zero on fabrics).
    pub maxcmd: u16,
    /// Number of namespaces (largest valid NSID).
    pub nn: u32,
    /// Optional NVM command support.
    pub oncs: u16,
    /// Fused operation support.
    pub fuses: u16,
    /// Volatile write cache (bit 0 present, bits 2:1 flush broadcast behaviour).
    pub vwc: u8,
    /// SGL support.
    pub sgls: u32,
    /// Subsystem NQN.
    pub subnqn: Nqn,
    /// I/O queue command capsule size in 16-byte units (>= 4: the SQE).
    pub ioccsz: u32,
    /// I/O queue response capsule size in 16-byte units (>= 1: the CQE).
    pub iorcsz: u32,
    /// In-capsule data offset in 16-byte units (Linux requires 0).
    pub icdoff: u16,
    /// Fabrics controller attributes (bit 0: static controller model).
    pub fcatt: u8,
    /// Maximum SGL data block descriptors (0 = no limit).
    pub msdbd: u8,
}

impl IdentifyController {
    /// An NVMe/TCP I/O controller with the defaults this target uses: NVMe
    /// 1.4, 64/16-byte entries, SGLs with offsets, `in_capsule_data` bytes of
    /// in-capsule data, Write Zeroes and DSM, 1 s keep-alive granularity.
    pub fn tcp_io(
        serial: &str,
        model: &str,
        firmware: &str,
        cntlid: CntlId,
        subnqn: Nqn,
        nn: u32,
        in_capsule_data: u32,
    ) -> IdentifyController {
        IdentifyController {
            vid: 0,
            ssvid: 0,
            serial: serial.to_owned(),
            model: model.to_owned(),
            firmware: firmware.to_owned(),
            ieee_oui: [0; 3],
            cmic: 1 << 1,
            mdts: 0,
            cntlid,
            ver: super::spec::version(1, 4, 0),
            oaes: 1 << 8,
            ctratt: 0,
            cntrltype: ControllerType::Io,
            oacs: 0,
            acl: 3,
            aerl: 3,
            frmw: 1 << 0 | 1 << 1,
            lpa: lpa::EXTENDED_DATA,
            elpe: 0,
            kas: 10,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: 128,
            nn,
            oncs: oncs::DSM | oncs::WRITE_ZEROES,
            fuses: 0,
            vwc: 1 | (3 << 1),
            sgls: sgls::SUPPORTED | sgls::OFFSET,
            subnqn,
            ioccsz: in_capsule_data.saturating_add(64) / 16,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: 1,
        }
    }

    /// Encodes the 4096-byte structure.
    pub fn encode(&self) -> Result<Vec<u8>, IdentifyError> {
        use ctrl_off as o;
        let mut b = vec![0u8; IDENTIFY_LEN];
        put_u16(&mut b, o::VID, self.vid);
        put_u16(&mut b, o::SSVID, self.ssvid);
        put_text(&mut b, o::SN, 20, &self.serial, "SN")?;
        put_text(&mut b, o::MN, 40, &self.model, "MN")?;
        put_text(&mut b, o::FR, 8, &self.firmware, "FR")?;
        put_bytes(&mut b, o::IEEE, &self.ieee_oui);
        put_u8(&mut b, o::CMIC, self.cmic);
        put_u8(&mut b, o::MDTS, self.mdts);
        put_u16(&mut b, o::CNTLID, self.cntlid.0);
        put_u32(&mut b, o::VER, self.ver);
        put_u32(&mut b, o::OAES, self.oaes);
        put_u32(&mut b, o::CTRATT, self.ctratt);
        put_u8(&mut b, o::CNTRLTYPE, self.cntrltype as u8);
        put_u16(&mut b, o::OACS, self.oacs);
        put_u8(&mut b, o::ACL, self.acl);
        put_u8(&mut b, o::AERL, self.aerl);
        put_u8(&mut b, o::FRMW, self.frmw);
        put_u8(&mut b, o::LPA, self.lpa);
        put_u8(&mut b, o::ELPE, self.elpe);
        put_u16(&mut b, o::KAS, self.kas);
        put_u8(&mut b, o::SQES, self.sqes);
        put_u8(&mut b, o::CQES, self.cqes);
        put_u16(&mut b, o::MAXCMD, self.maxcmd);
        put_u32(&mut b, o::NN, self.nn);
        put_u16(&mut b, o::ONCS, self.oncs);
        put_u16(&mut b, o::FUSES, self.fuses);
        put_u8(&mut b, o::VWC, self.vwc);
        put_u32(&mut b, o::SGLS, self.sgls);
        put_ascii_nul_padded(&mut b, o::SUBNQN, NQN_FIELD_LEN, self.subnqn.as_str());
        put_u32(&mut b, o::IOCCSZ, self.ioccsz);
        put_u32(&mut b, o::IORCSZ, self.iorcsz);
        put_u16(&mut b, o::ICDOFF, self.icdoff);
        put_u8(&mut b, o::FCATT, self.fcatt);
        put_u8(&mut b, o::MSDBD, self.msdbd);
        Ok(b)
    }
}

fn put_text(
    b: &mut [u8],
    off: usize,
    width: usize,
    s: &str,
    name: &'static str,
) -> Result<(), IdentifyError> {
    if s.len() > width || !s.bytes().all(|c| (0x20..=0x7e).contains(&c)) {
        return Err(IdentifyError::BadText(name));
    }
    put_ascii_space_padded(b, off, width, s);
    Ok(())
}

/// DLFEAT bits.
pub mod dlfeat {
    /// Deallocated blocks read as zeroes (bits 2:0 = 001b).
    pub const READ_ZEROES: u8 = 0x1;
    /// Deallocated blocks read as all ones (bits 2:0 = 010b).
    pub const READ_ONES: u8 = 0x2;
    /// Write Zeroes may deallocate (DEAC bit honoured).
    pub const WRITE_ZEROES_DEALLOCATE: u8 = 1 << 3;
}

/// Identify Namespace byte offsets.
pub mod ns_off {
    /// Namespace size in blocks.
    pub const NSZE: usize = 0;
    /// Namespace capacity in blocks.
    pub const NCAP: usize = 8;
    /// Namespace utilisation in blocks.
    pub const NUSE: usize = 16;
    /// Namespace features.
    pub const NSFEAT: usize = 24;
    /// Number of LBA formats (0's based).
    pub const NLBAF: usize = 25;
    /// Formatted LBA size.
    pub const FLBAS: usize = 26;
    /// Multi-path I/O and sharing capabilities.
    pub const NMIC: usize = 30;
    /// Deallocate logical block features.
    pub const DLFEAT: usize = 33;
    /// Namespace optimal I/O boundary (blocks).
    pub const NOIOB: usize = 46;
    /// ANA group ID.
    pub const ANAGRPID: usize = 92;
    /// Namespace GUID (16 bytes).
    pub const NGUID: usize = 104;
    /// IEEE extended unique identifier (8 bytes).
    pub const EUI64: usize = 120;
    /// LBA format 0 (4 bytes each).
    pub const LBAF0: usize = 128;
}

/// NSFEAT bit: thin provisioning (NCAP/NUSE meaningful).
pub const NSFEAT_THIN: u8 = 1 << 0;
/// NSFEAT bit: deallocated or unwritten logical block error support.
pub const NSFEAT_DULBE: u8 = 1 << 2;

/// What an Identify Namespace reports (one LBA format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Size in logical blocks.
    pub nsze: u64,
    /// Capacity in logical blocks.
    pub ncap: u64,
    /// Blocks in use.
    pub nuse: u64,
    /// Namespace features.
    pub nsfeat: u8,
    /// Logical block size (LBAF0.LBADS).
    pub block_size: BlockSize,
    /// Multi-path sharing (bit 0: may be attached to several controllers).
    pub nmic: u8,
    /// Deallocate features.
    pub dlfeat: u8,
    /// Optimal I/O boundary in blocks (0 = none).
    pub noiob: u16,
    /// ANA group (0 = none).
    pub anagrpid: u32,
    /// Namespace GUID.
    pub nguid: [u8; 16],
    /// EUI-64.
    pub eui64: [u8; 8],
}

impl IdentifyNamespace {
    /// A fully provisioned namespace of `capacity` bytes (rounded down to
    /// whole blocks) that reads zeroes after deallocation.
    pub fn new(capacity: ByteLen, block_size: BlockSize, nguid: [u8; 16]) -> IdentifyNamespace {
        let blocks = capacity.0 >> block_size.shift();
        IdentifyNamespace {
            nsze: blocks,
            ncap: blocks,
            nuse: blocks,
            nsfeat: 0,
            block_size,
            nmic: 1,
            dlfeat: dlfeat::READ_ZEROES | dlfeat::WRITE_ZEROES_DEALLOCATE,
            noiob: 0,
            anagrpid: 0,
            nguid,
            eui64: [0; 8],
        }
    }

    /// Encodes the 4096-byte structure.
    pub fn encode(&self) -> Vec<u8> {
        use ns_off as o;
        let mut b = vec![0u8; IDENTIFY_LEN];
        put_u64(&mut b, o::NSZE, self.nsze);
        put_u64(&mut b, o::NCAP, self.ncap);
        put_u64(&mut b, o::NUSE, self.nuse);
        put_u8(&mut b, o::NSFEAT, self.nsfeat);
        put_u8(&mut b, o::NLBAF, 0);
        put_u8(&mut b, o::FLBAS, 0);
        put_u8(&mut b, o::NMIC, self.nmic);
        put_u8(&mut b, o::DLFEAT, self.dlfeat);
        put_u16(&mut b, o::NOIOB, self.noiob);
        put_u32(&mut b, o::ANAGRPID, self.anagrpid);
        put_bytes(&mut b, o::NGUID, &self.nguid);
        put_bytes(&mut b, o::EUI64, &self.eui64);
        // LBAF0: MS (15:0) = 0, LBADS (23:16), RP (25:24) = 0 (best).
        put_u32(&mut b, o::LBAF0, (self.block_size.shift() & 0xff) << 16);
        b
    }
}

/// Identify with CNS 00h for an inactive but valid NSID: all zeroes.
pub fn inactive_namespace() -> Vec<u8> {
    vec![0u8; IDENTIFY_LEN]
}

/// The active namespace ID list (CNS 02h): up to 1024 active NSIDs greater
/// than `after`, ascending, zero filled. NSIDs FFFFFFFEh and FFFFFFFFh are
/// not valid starting points.
pub fn active_ns_list(active: &[Nsid], after: Nsid) -> Result<Vec<u8>, Status> {
    if after.0 >= 0xffff_fffe {
        return Err(Status::INVALID_NAMESPACE.with_dnr());
    }
    let mut ids: Vec<u32> = active
        .iter()
        .map(|n| n.0)
        .filter(|&n| n > after.0 && Nsid(n).is_single())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let mut b = vec![0u8; IDENTIFY_LEN];
    for (i, id) in ids.iter().take(IDENTIFY_LEN / 4).enumerate() {
        put_u32(&mut b, i * 4, *id);
    }
    Ok(b)
}

/// Namespace identification descriptor types (NIDT).
pub mod nidt {
    /// IEEE EUI-64 (8 bytes).
    pub const EUI64: u8 = 1;
    /// Namespace GUID (16 bytes).
    pub const NGUID: u8 = 2;
    /// Namespace UUID (16 bytes).
    pub const UUID: u8 = 3;
    /// Command set identifier (1 byte).
    pub const CSI: u8 = 4;
}

/// Namespace identifiers for the descriptor list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NamespaceIds {
    /// EUI-64, if any.
    pub eui64: Option<[u8; 8]>,
    /// NGUID, if any.
    pub nguid: Option<[u8; 16]>,
    /// UUID, if any.
    pub uuid: Option<[u8; 16]>,
    /// Command set identifier, if reported (0 = NVM).
    pub csi: Option<u8>,
}

/// The namespace identification descriptor list (CNS 03h): each entry is
/// NIDT, NIDL, two reserved bytes, then NIDL bytes of identifier.
pub fn ns_id_descriptors(ids: &NamespaceIds) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let mut off = 0usize;
    let mut push = |t: u8, v: &[u8]| {
        put_u8(&mut b, off, t);
        put_u8(&mut b, off + 1, v.len() as u8);
        put_bytes(&mut b, off + 4, v);
        off += 4 + v.len();
    };
    if let Some(v) = ids.eui64 {
        push(nidt::EUI64, &v);
    }
    if let Some(v) = ids.nguid {
        push(nidt::NGUID, &v);
    }
    if let Some(v) = ids.uuid {
        push(nidt::UUID, &v);
    }
    if let Some(v) = ids.csi {
        push(nidt::CSI, &[v]);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::spec::{DataSgl, Sqe};

    fn ctrl() -> IdentifyController {
        IdentifyController::tcp_io(
            "MP0001",
            "mirrorpoint",
            "0.1",
            CntlId(0x0102),
            Nqn::new("nqn.2024-01.io.mirrorpoint:vol0").unwrap(),
            4,
            8192,
        )
    }

    #[test]
    fn controller_offsets() {
        let b = ctrl().encode().unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[4..10], b"MP0001");
        assert_eq!(&b[10..24], &[b' '; 14]);
        assert_eq!(&b[24..35], b"mirrorpoint");
        assert_eq!(b[63], b' ');
        assert_eq!(&b[64..67], b"0.1");
        assert_eq!(&b[78..80], &[0x02, 0x01]);
        assert_eq!(&b[80..84], &0x0001_0400u32.to_le_bytes());
        assert_eq!(b[111], 1);
        assert_eq!(b[261], lpa::EXTENDED_DATA);
        assert_eq!(&b[320..322], &10u16.to_le_bytes());
        assert_eq!(b[512], 0x66);
        assert_eq!(b[513], 0x44);
        assert_eq!(&b[514..516], &128u16.to_le_bytes());
        assert_eq!(&b[516..520], &4u32.to_le_bytes());
        assert_eq!(&b[520..522], &0x000cu16.to_le_bytes());
        assert_eq!(&b[536..540], &((1u32 << 20) | 1).to_le_bytes());
        assert_eq!(&b[768..799], b"nqn.2024-01.io.mirrorpoint:vol0");
        assert_eq!(b[799], 0);
        assert_eq!(&b[1792..1796], &((64 + 8192) / 16u32).to_le_bytes());
        assert_eq!(&b[1796..1800], &1u32.to_le_bytes());
        assert_eq!(&b[1800..1802], &[0, 0]);
        assert_eq!(b[1803], 1);
    }

    #[test]
    fn controller_text_validation() {
        let mut c = ctrl();
        c.serial = "x".repeat(21);
        assert_eq!(c.encode(), Err(IdentifyError::BadText("SN")));
        let mut c = ctrl();
        c.model = "modèle".into();
        assert_eq!(c.encode(), Err(IdentifyError::BadText("MN")));
    }

    #[test]
    fn namespace_offsets() {
        let ns = IdentifyNamespace::new(ByteLen(1 << 30), BlockSize::B4096, [7; 16]);
        let b = ns.encode();
        assert_eq!(&b[0..8], &(262144u64).to_le_bytes());
        assert_eq!(&b[8..16], &(262144u64).to_le_bytes());
        assert_eq!(b[25], 0);
        assert_eq!(b[26], 0);
        assert_eq!(b[33], 0x09);
        assert_eq!(&b[104..120], &[7; 16]);
        assert_eq!(&b[128..132], &[0, 0, 12, 0]);
        let ns512 = IdentifyNamespace {
            noiob: 256,
            ..IdentifyNamespace::new(ByteLen(1000), BlockSize::B512, [0; 16])
        };
        let b = ns512.encode();
        assert_eq!(&b[0..8], &1u64.to_le_bytes());
        assert_eq!(b[130], 9);
        assert_eq!(&b[46..48], &256u16.to_le_bytes());
    }

    #[test]
    fn active_list() {
        let b = active_ns_list(
            &[Nsid(3), Nsid(1), Nsid(2), Nsid(0), Nsid::BROADCAST],
            Nsid(1),
        )
        .unwrap();
        assert_eq!(&b[..12], &[2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert!(active_ns_list(&[], Nsid(0xffff_fffe)).is_err());
        let many: Vec<Nsid> = (1..=2000).map(Nsid).collect();
        let b = active_ns_list(&many, Nsid(0)).unwrap();
        assert_eq!(&b[4092..4096], &1024u32.to_le_bytes());
    }

    #[test]
    fn descriptors() {
        let b = ns_id_descriptors(&NamespaceIds {
            eui64: None,
            nguid: Some([0xaa; 16]),
            uuid: Some([0xbb; 16]),
            csi: None,
        });
        assert_eq!(&b[0..4], &[2, 16, 0, 0]);
        assert_eq!(&b[4..20], &[0xaa; 16]);
        assert_eq!(&b[20..24], &[3, 16, 0, 0]);
        assert_eq!(&b[24..40], &[0xbb; 16]);
        assert!(b[40..].iter().all(|&x| x == 0));
    }

    #[test]
    fn identify_command() {
        let mut sqe = Sqe::new(
            0x06,
            CommandId(3),
            Nsid(0),
            DataSgl::Transport { len: 4096 },
        );
        sqe.cdw[0] = 0x0001_0001;
        let c = IdentifyCommand::from_sqe(&sqe);
        assert_eq!(c.cns(), Some(Cns::Controller));
        assert_eq!(c.cntid, 1);
    }
}
