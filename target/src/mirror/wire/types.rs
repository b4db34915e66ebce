//! Newtypes and small enums carried on the wire.
//!
//! Ids are distinct types so that a sequence number cannot be passed where an
//! epoch was meant; enums are closed (an unknown code is a decode error, not a
//! silent `Unknown`), because a mirror that misreads a status can lose writes.
//! Byte positions use [`crate::units`].

use std::fmt;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident($inner:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_newtype!(
    /// Position of a write in a mirror's replication stream, per mirror.
    SeqNo(u64)
);
id_newtype!(
    /// Mirror epoch; bumped at every split or role change. Stale-epoch writes are refused.
    Epoch(u32)
);
id_newtype!(
    /// One leg (replica) of a mirror.
    LegId(u32)
);
id_newtype!(
    /// A mirrored volume (virtual mirror device).
    MirrorId(u64)
);
/// Volumes and mirrors share one id space: a mirrored volume is a mirror.
pub type VolumeId = MirrorId;

id_newtype!(
    /// A data generation id (DRBD UUID idea): which history a leg's data belongs to.
    Generation(u64)
);
id_newtype!(
    /// Request tag chosen by the sender, echoed in the reply's frame header.
    RequestTag(u64)
);
id_newtype!(
    /// A storage server within a domain.
    StorageServerId(u32)
);
id_newtype!(
    /// A mirror domain (site), as agents name it.
    DomainId(u32)
);
id_newtype!(
    /// Nanoseconds since the Unix epoch, by the clock of the site that stamped it.
    Timestamp(u64)
);

/// A protocol version. Frames of another major version are refused; minor
/// versions within a major are negotiated in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    /// Incompatible layout changes.
    pub major: u8,
    /// Compatible additions, used only once both sides agreed on them.
    pub minor: u8,
}

impl ProtocolVersion {
    /// The version this code speaks.
    pub const CURRENT: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };

    /// A version.
    pub const fn new(major: u8, minor: u8) -> Self {
        ProtocolVersion { major, minor }
    }
}

impl Default for ProtocolVersion {
    fn default() -> Self {
        ProtocolVersion::CURRENT
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// An inclusive range of versions a side can speak; `min <= max` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    min: ProtocolVersion,
    max: ProtocolVersion,
}

impl VersionRange {
    /// Only [`ProtocolVersion::CURRENT`].
    pub const CURRENT: VersionRange = VersionRange {
        min: ProtocolVersion::CURRENT,
        max: ProtocolVersion::CURRENT,
    };

    /// A range, or `None` if `min > max`.
    pub fn new(min: ProtocolVersion, max: ProtocolVersion) -> Option<Self> {
        (min <= max).then_some(VersionRange { min, max })
    }

    /// Lowest version.
    pub fn min(&self) -> ProtocolVersion {
        self.min
    }

    /// Highest version.
    pub fn max(&self) -> ProtocolVersion {
        self.max
    }

    /// The highest version in both ranges, if they overlap.
    pub fn negotiate(&self, other: &VersionRange) -> Option<ProtocolVersion> {
        let hi = self.max.min(other.max);
        let lo = self.min.max(other.min);
        (lo <= hi).then_some(hi)
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident : $repr:ty { $($(#[$vm:meta])* $v:ident = $n:expr,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $($(#[$vm])* $v = $n,)*
        }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            /// The wire value.
            pub fn to_wire(self) -> $repr {
                self as $repr
            }

            /// From a wire value, if known.
            pub fn from_wire(v: $repr) -> Option<Self> {
                match v {
                    $($n => Some($name::$v),)*
                    _ => None,
                }
            }
        }
    };
}

wire_enum!(
    /// Outcome of a request.
    Status: u32 {
        /// Done.
        Ok = 0,
        /// The backing device failed the I/O.
        IoError = 1,
        /// No space left (allocation or thin backing).
        NoSpace = 2,
        /// The request carries an epoch older than the receiver's.
        StaleEpoch = 3,
        /// The range lies outside the device.
        OutOfRange = 4,
        /// The request is malformed for the receiver's state.
        InvalidRequest = 5,
        /// The receiver does not implement the request.
        Unsupported = 6,
        /// Try again later.
        Busy = 7,
        /// The mirror or extent is not known to the receiver.
        NotFound = 8,
    }
);

wire_enum!(
    /// Reason carried by an Error message before the sender closes the connection.
    ErrorCode: u32 {
        /// The peer violated the protocol (bad frame, bad field).
        Protocol = 1,
        /// The peer failed authentication.
        AuthFailed = 2,
        /// No common protocol version.
        VersionMismatch = 3,
        /// A message out of order.
        UnexpectedMessage = 4,
        /// The sender hit an internal error.
        Internal = 5,
        /// The sender is shutting down.
        Shutdown = 6,
        /// The peer is not the site the sender expected.
        UnexpectedPeer = 7,
    }
);

wire_enum!(
    /// Health of a storage server in a capacity report.
    Health: u8 {
        /// Serving normally.
        Healthy = 0,
        /// Serving with reduced redundancy or performance; avoid for new extents.
        Degraded = 1,
        /// Not serving.
        Failed = 2,
    }
);

wire_enum!(
    /// Digest used by range digests.
    DigestAlgo: u8 {
        /// SHA-256, 32 bytes per region.
        Sha256 = 1,
    }
);

impl DigestAlgo {
    /// Bytes of one region digest.
    pub fn digest_len(self) -> usize {
        match self {
            DigestAlgo::Sha256 => 32,
        }
    }
}

wire_enum!(
    /// Which side of the handshake sent a Hello.
    Role: u8 {
        /// Opened the connection.
        Initiator = 1,
        /// Accepted the connection.
        Acceptor = 2,
    }
);

/// Longest site name.
pub const MAX_SITE_NAME: usize = 64;

/// A site / domain name: 1 to 64 bytes of `[A-Za-z0-9._:-]`. Restricting the
/// alphabet keeps names printable in logs and unambiguous in the handshake
/// transcript.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteName(String);

/// A site name that is empty, too long or has a character outside `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("site names are 1 to 64 bytes of [A-Za-z0-9._:-]")]
pub struct InvalidSiteName;

impl SiteName {
    /// Checks and wraps a name.
    pub fn new(name: &str) -> Result<Self, InvalidSiteName> {
        Self::from_bytes(name.as_bytes())
    }

    /// Checks and wraps a name given as bytes (from the wire).
    pub fn from_bytes(name: &[u8]) -> Result<Self, InvalidSiteName> {
        let ok = !name.is_empty()
            && name.len() <= MAX_SITE_NAME
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if !ok {
            return Err(InvalidSiteName);
        }
        std::str::from_utf8(name)
            .map(|s| SiteName(s.to_owned()))
            .map_err(|_| InvalidSiteName)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SiteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_picks_highest_common() {
        let v = ProtocolVersion::new;
        let a = VersionRange::new(v(1, 0), v(1, 3)).unwrap();
        let b = VersionRange::new(v(1, 2), v(1, 5)).unwrap();
        assert_eq!(a.negotiate(&b), Some(v(1, 3)));
        let c = VersionRange::new(v(1, 4), v(1, 5)).unwrap();
        assert_eq!(a.negotiate(&c), None);
        assert!(VersionRange::new(v(2, 0), v(1, 9)).is_none());
    }

    #[test]
    fn site_names_are_checked() {
        assert!(SiteName::new("site-a.dc1:7").is_ok());
        assert_eq!(SiteName::new(""), Err(InvalidSiteName));
        assert_eq!(SiteName::new("a b"), Err(InvalidSiteName));
        assert_eq!(SiteName::new(&"x".repeat(65)), Err(InvalidSiteName));
        assert!(SiteName::new(&"x".repeat(64)).is_ok());
        assert_eq!(SiteName::from_bytes(&[0xff]), Err(InvalidSiteName));
    }

    #[test]
    fn enums_round_trip_and_reject_unknown() {
        for s in Status::ALL {
            assert_eq!(Status::from_wire(s.to_wire()), Some(*s));
        }
        assert_eq!(Status::from_wire(999), None);
        assert_eq!(ErrorCode::from_wire(0), None);
        assert_eq!(Health::from_wire(3), None);
        assert_eq!(DigestAlgo::from_wire(0), None);
    }
}
