//! Newtypes for the units the data path speaks: logical blocks, byte offsets,
//! byte lengths and block sizes. Keeping them apart in the type system makes
//! "LBA passed where a byte offset was meant" a compile error.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A logical block address, in units of the volume's block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Lba(pub u64);

/// A byte offset from the start of a volume or device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteOffset(pub u64);

/// A length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteLen(pub u64);

/// A logical block size in bytes: a power of two between 512 and 64 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BlockSize(u32);

/// A block size that is not a power of two in 512..=65536.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("block size {0} is not a power of two between 512 and 65536")]
pub struct InvalidBlockSize(pub u32);

impl BlockSize {
    /// 512-byte blocks.
    pub const B512: BlockSize = BlockSize(512);
    /// 4 KiB blocks.
    pub const B4096: BlockSize = BlockSize(4096);

    /// Checks and wraps a block size.
    pub fn new(bytes: u32) -> Result<Self, InvalidBlockSize> {
        if bytes.is_power_of_two() && (512..=65536).contains(&bytes) {
            Ok(BlockSize(bytes))
        } else {
            Err(InvalidBlockSize(bytes))
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// log2 of the size, as NVMe's LBADS and iSCSI's block length shift use.
    pub fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// The byte offset of a block, or `None` on overflow.
    pub fn offset_of(self, lba: Lba) -> Option<ByteOffset> {
        lba.0.checked_mul(u64::from(self.0)).map(ByteOffset)
    }

    /// The byte length of `blocks` blocks, or `None` on overflow.
    pub fn len_of(self, blocks: u64) -> Option<ByteLen> {
        blocks.checked_mul(u64::from(self.0)).map(ByteLen)
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = InvalidBlockSize;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        BlockSize::new(v)
    }
}

impl From<BlockSize> for u32 {
    fn from(b: BlockSize) -> u32 {
        b.0
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_accepts_powers_of_two_only() {
        assert!(BlockSize::new(512).is_ok());
        assert!(BlockSize::new(4096).is_ok());
        assert_eq!(BlockSize::new(1000), Err(InvalidBlockSize(1000)));
        assert_eq!(BlockSize::new(256), Err(InvalidBlockSize(256)));
        assert_eq!(BlockSize::B4096.shift(), 12);
    }

    #[test]
    fn offsets_do_not_overflow_silently() {
        assert_eq!(BlockSize::B512.offset_of(Lba(2)), Some(ByteOffset(1024)));
        assert_eq!(BlockSize::B4096.offset_of(Lba(u64::MAX)), None);
    }
}
