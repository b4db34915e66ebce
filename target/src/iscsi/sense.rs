//! SCSI sense data (SPC-4 §4.5) as an iSCSI target returns it with CHECK
//! CONDITION: fixed format (response codes 70h/71h) and descriptor format
//! (72h/73h), the sense keys, the ASC/ASCQ pairs a block target needs, and the
//! iSCSI wrapping of sense data in a SCSI Response data segment (RFC 7143
//! §11.4.7: a 2-byte SenseLength before the sense bytes).
//!
//! [`Sense`] is a plain value (key, additional sense code, optional
//! information and sense-key-specific fields) so command handlers can build it
//! cheaply; the byte layout is decided only when it is encoded, in whichever
//! format the logical unit reports (D_SENSE in the Control mode page).

/// Sense keys (SPC-4 Table 28).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    VendorSpecific = 0x9,
    CopyAborted = 0xa,
    AbortedCommand = 0xb,
    VolumeOverflow = 0xd,
    Miscompare = 0xe,
    Completed = 0xf,
}

/// An additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Asc(pub u8, pub u8);

impl Asc {
    pub const NO_ADDITIONAL_SENSE: Asc = Asc(0x00, 0x00);
    pub const LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE: Asc = Asc(0x04, 0x00);
    pub const LOGICAL_UNIT_NOT_READY_BECOMING_READY: Asc = Asc(0x04, 0x01);
    pub const LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED: Asc = Asc(0x04, 0x02);
    pub const LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION_REQUIRED: Asc = Asc(0x04, 0x03);
    pub const LOGICAL_UNIT_COMMUNICATION_FAILURE: Asc = Asc(0x08, 0x00);
    pub const WRITE_ERROR: Asc = Asc(0x0c, 0x00);
    pub const LOGICAL_BLOCK_GUARD_CHECK_FAILED: Asc = Asc(0x10, 0x01);
    pub const LOGICAL_BLOCK_APPLICATION_TAG_CHECK_FAILED: Asc = Asc(0x10, 0x02);
    pub const LOGICAL_BLOCK_REFERENCE_TAG_CHECK_FAILED: Asc = Asc(0x10, 0x03);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x11, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc(0x1a, 0x00);
    pub const MISCOMPARE_DURING_VERIFY_OPERATION: Asc = Asc(0x1d, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc(0x20, 0x00);
    pub const LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE: Asc = Asc(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x24, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: Asc = Asc(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc(0x26, 0x00);
    pub const PARAMETER_NOT_SUPPORTED: Asc = Asc(0x26, 0x01);
    pub const PARAMETER_VALUE_INVALID: Asc = Asc(0x26, 0x02);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = Asc(0x26, 0x04);
    pub const WRITE_PROTECTED: Asc = Asc(0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = Asc(0x27, 0x07);
    pub const NOT_READY_TO_READY_CHANGE: Asc = Asc(0x28, 0x00);
    pub const POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED: Asc = Asc(0x29, 0x00);
    pub const POWER_ON_OCCURRED: Asc = Asc(0x29, 0x01);
    pub const I_T_NEXUS_LOSS_OCCURRED: Asc = Asc(0x29, 0x07);
    pub const PARAMETERS_CHANGED: Asc = Asc(0x2a, 0x00);
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc(0x2a, 0x01);
    pub const RESERVATIONS_PREEMPTED: Asc = Asc(0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: Asc = Asc(0x2a, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Asc = Asc(0x2a, 0x05);
    pub const CAPACITY_DATA_HAS_CHANGED: Asc = Asc(0x2a, 0x09);
    pub const COMMAND_SEQUENCE_ERROR: Asc = Asc(0x2c, 0x00);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Asc = Asc(0x2f, 0x00);
    pub const THIN_PROVISIONING_SOFT_THRESHOLD_REACHED: Asc = Asc(0x38, 0x07);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc(0x39, 0x00);
    pub const MEDIUM_NOT_PRESENT: Asc = Asc(0x3a, 0x00);
    pub const REPORTED_LUNS_DATA_HAS_CHANGED: Asc = Asc(0x3f, 0x0e);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x44, 0x00);
    pub const PROTOCOL_SERVICE_CRC_ERROR: Asc = Asc(0x47, 0x05);
    pub const INITIATOR_DETECTED_ERROR_MESSAGE_RECEIVED: Asc = Asc(0x48, 0x00);
    pub const INVALID_MESSAGE_ERROR: Asc = Asc(0x49, 0x00);
    pub const OVERLAPPED_COMMANDS_ATTEMPTED: Asc = Asc(0x4e, 0x00);
    pub const MEDIUM_REMOVAL_PREVENTED: Asc = Asc(0x53, 0x02);
    pub const INSUFFICIENT_RESOURCES: Asc = Asc(0x55, 0x03);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = Asc(0x55, 0x04);
}

/// Sense-key-specific information (SPC-4 §4.5.2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SenseKeySpecific {
    /// For ILLEGAL REQUEST: which byte (and optionally bit) is wrong, in the
    /// CDB (`in_cdb`) or in the parameter list.
    FieldPointer {
        in_cdb: bool,
        byte: u16,
        bit: Option<u8>,
    },
    /// For NOT READY / NO SENSE: progress indication (0..=65535).
    Progress(u16),
}

impl SenseKeySpecific {
    fn bytes(self) -> [u8; 3] {
        match self {
            SenseKeySpecific::FieldPointer { in_cdb, byte, bit } => {
                let mut b0 = 0x80;
                if in_cdb {
                    b0 |= 0x40;
                }
                if let Some(bit) = bit {
                    b0 |= 0x08 | (bit & 0x07);
                }
                let [hi, lo] = byte.to_be_bytes();
                [b0, hi, lo]
            }
            SenseKeySpecific::Progress(p) => {
                let [hi, lo] = p.to_be_bytes();
                [0x80, hi, lo]
            }
        }
    }
}

/// Sense data to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// INFORMATION field (e.g. the LBA or byte offset of a miscompare).
    pub information: Option<u64>,
    pub specific: Option<SenseKeySpecific>,
    /// True for deferred errors (response code 71h/73h).
    pub deferred: bool,
}

/// Length of fixed-format sense data as we build it.
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    /// Sense with just a key and ASC/ASCQ.
    pub fn new(key: SenseKey, asc: Asc) -> Self {
        Sense {
            key,
            asc,
            information: None,
            specific: None,
            deferred: false,
        }
    }

    /// Add an INFORMATION field.
    #[must_use]
    pub fn with_information(mut self, info: u64) -> Self {
        self.information = Some(info);
        self
    }

    /// Add a sense-key-specific field.
    #[must_use]
    pub fn with_specific(mut self, s: SenseKeySpecific) -> Self {
        self.specific = Some(s);
        self
    }

    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    pub fn invalid_opcode() -> Self {
        Sense::new(
            SenseKey::IllegalRequest,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        )
        .with_specific(SenseKeySpecific::FieldPointer {
            in_cdb: true,
            byte: 0,
            bit: None,
        })
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at `byte` (and `bit`).
    pub fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Self {
        Sense::new(SenseKey::IllegalRequest, Asc::INVALID_FIELD_IN_CDB).with_specific(
            SenseKeySpecific::FieldPointer {
                in_cdb: true,
                byte,
                bit,
            },
        )
    }

    /// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub fn lba_out_of_range() -> Self {
        Sense::new(
            SenseKey::IllegalRequest,
            Asc::LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE,
        )
    }

    /// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION at byte `offset`.
    pub fn miscompare(offset: u64) -> Self {
        Sense::new(
            SenseKey::Miscompare,
            Asc::MISCOMPARE_DURING_VERIFY_OPERATION,
        )
        .with_information(offset)
    }

    /// Fixed-format sense data (SPC-4 §4.5.3), 18 bytes. An INFORMATION value
    /// that does not fit 32 bits is reported with VALID=0 (descriptor format
    /// carries 64 bits).
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = if self.deferred { 0x71 } else { 0x70 };
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key as u8;
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        b[12] = self.asc.0;
        b[13] = self.asc.1;
        if let Some(s) = self.specific {
            b[15..18].copy_from_slice(&s.bytes());
        }
        b
    }

    /// Descriptor-format sense data (SPC-4 §4.5.2) with an Information
    /// descriptor and a sense-key-specific descriptor when present.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut b = vec![
            if self.deferred { 0x73 } else { 0x72 },
            self.key as u8,
            self.asc.0,
            self.asc.1,
            0,
            0,
            0,
            0,
        ];
        if let Some(info) = self.information {
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(s) = self.specific {
            b.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            b.extend_from_slice(&s.bytes());
            b.push(0);
        }
        let add = u8::try_from(b.len() - 8).unwrap_or(u8::MAX);
        if let Some(l) = b.get_mut(7) {
            *l = add;
        }
        b
    }

    /// Encode in the requested format.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            self.to_descriptor()
        } else {
            self.to_fixed().to_vec()
        }
    }
}

/// SCSI status CHECK CONDITION.
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
/// SCSI status GOOD.
pub const STATUS_GOOD: u8 = 0x00;
/// SCSI status BUSY.
pub const STATUS_BUSY: u8 = 0x08;
/// SCSI status RESERVATION CONFLICT.
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;
/// SCSI status TASK SET FULL.
pub const STATUS_TASK_SET_FULL: u8 = 0x28;

/// The data segment of a SCSI Response carrying sense data: 2-byte
/// SenseLength followed by the sense bytes (RFC 7143 §11.4.7.2).
pub fn scsi_response_sense_segment(sense: &[u8]) -> Vec<u8> {
    let len = u16::try_from(sense.len()).unwrap_or(u16::MAX);
    let mut v = Vec::with_capacity(2 + sense.len());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(sense.get(..usize::from(len)).unwrap_or(sense));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_invalid_field_in_cdb() {
        let s = Sense::invalid_field_in_cdb(2, Some(5)).to_fixed();
        assert_eq!(
            s,
            [0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xcd, 0, 2]
        );
        let s = Sense::invalid_opcode().to_fixed();
        assert_eq!(
            (s[2], s[12], s[13], s[15], s[16], s[17]),
            (5, 0x20, 0, 0xc0, 0, 0)
        );
    }

    #[test]
    fn fixed_with_information() {
        let s = Sense::miscompare(0x1234).to_fixed();
        assert_eq!(s[0], 0xf0);
        assert_eq!(s[2], 0x0e);
        assert_eq!(&s[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!((s[12], s[13]), (0x1d, 0));
        // Too large for fixed format: VALID stays 0.
        let s = Sense::lba_out_of_range()
            .with_information(1 << 40)
            .to_fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(&s[3..7], &[0; 4]);
        let mut d = Sense::new(SenseKey::UnitAttention, Asc::POWER_ON_OCCURRED);
        d.deferred = true;
        assert_eq!(d.to_fixed()[0], 0x71);
    }

    #[test]
    fn descriptor_format() {
        let s = Sense::new(SenseKey::UnitAttention, Asc::CAPACITY_DATA_HAS_CHANGED).to_descriptor();
        assert_eq!(s, vec![0x72, 0x06, 0x2a, 0x09, 0, 0, 0, 0]);
        let s = Sense::miscompare(1 << 40)
            .with_specific(SenseKeySpecific::Progress(0x100))
            .to_descriptor();
        assert_eq!(&s[..8], &[0x72, 0x0e, 0x1d, 0x00, 0, 0, 0, 20]);
        assert_eq!(&s[8..20], &[0, 0x0a, 0x80, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&s[20..28], &[0x02, 0x06, 0, 0, 0x80, 0x01, 0x00, 0]);
        assert_eq!(s.len(), 28);
        assert_eq!(Sense::lba_out_of_range().encode(true)[0], 0x72);
        assert_eq!(Sense::lba_out_of_range().encode(false).len(), 18);
    }

    #[test]
    fn iscsi_segment() {
        let s = Sense::lba_out_of_range().to_fixed();
        let seg = scsi_response_sense_segment(&s);
        assert_eq!(&seg[..2], &[0, 18]);
        assert_eq!(&seg[2..], &s);
    }
}
