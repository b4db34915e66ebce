//! NVM I/O command execution onto a volume channel.
//!
//! Read, Write, Flush, Write Zeroes and Dataset Management become calls on
//! the queue's own [`VolumeChannel`] (opened on the queue's reactor, so the
//! data path takes no lock). Buffers are pool chunks end to end: a write's
//! data was received straight into its chunk and is frozen and handed to the
//! volume as is; a read fills a chunk that is then sent to the socket as is.
//! Volume errors map onto the NVMe status a host can act on.

use super::spec::{DataSgl, DsmCommand, NvmOpcode, RwCommand, Sqe, Status};
use super::subsystem::Namespace;
use crate::units::{ByteLen, ByteOffset};
use crate::volume::{VolumeChannel, VolumeError};
use mirrorpoint_poller::{buffer_pool, sleep, IoBuf, IoBufMut};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a command waits for a free pool chunk before failing with a
/// retryable status.
pub const BUFFER_WAIT: Duration = Duration::from_secs(1);

/// A namespace opened on this reactor.
pub struct NsChannel {
    /// The namespace.
    pub ns: Arc<Namespace>,
    /// Its volume channel on this core.
    pub chan: VolumeChannel,
}

/// Whether a failed request was a read or a write (picks the media status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Data from the volume.
    Read,
    /// Data to the volume.
    Write,
    /// No data (flush, zeroes, deallocate).
    None,
}

/// The NVMe status for a volume error.
pub fn volume_status(e: &VolumeError, dir: Dir) -> Status {
    match e {
        VolumeError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE.with_dnr(),
        VolumeError::ZeroLength { .. } | VolumeError::Misaligned { .. } => {
            Status::INVALID_FIELD.with_dnr()
        }
        VolumeError::NoBuffer => Status::COMMAND_INTERRUPTED,
        VolumeError::Io(err) => io_status(err, dir),
    }
}

fn io_status(e: &io::Error, dir: Dir) -> Status {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => Status::CAPACITY_EXCEEDED.with_dnr(),
        Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => {
            Status::NAMESPACE_WRITE_PROTECTED.with_dnr()
        }
        Some(libc::EIO) | Some(libc::ENODATA) | Some(libc::EBADMSG) => match dir {
            Dir::Read => Status::UNRECOVERED_READ_ERROR,
            Dir::Write => Status::WRITE_FAULT,
            Dir::None => Status::INTERNAL_ERROR,
        },
        Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::EINTR) => Status::COMMAND_INTERRUPTED,
        _ if e.kind() == io::ErrorKind::UnexpectedEof => Status::DATA_TRANSFER_ERROR,
        _ => Status::INTERNAL_ERROR,
    }
}

/// A pool chunk of `len` bytes, waiting up to [`BUFFER_WAIT`] for one to
/// free up; `None` if `len` exceeds a chunk or none came free.
pub async fn alloc_wait(len: usize) -> Option<IoBufMut> {
    let pool = buffer_pool();
    if len > pool.chunk_size() {
        return None;
    }
    let deadline = Instant::now() + BUFFER_WAIT;
    loop {
        if let Some(b) = pool.alloc(len) {
            return Some(b);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_micros(200)).await;
    }
}

/// What an I/O command produced.
pub struct IoOutcome {
    /// Completion status.
    pub status: Status,
    /// Read data to send before the completion.
    pub data: Option<IoBuf>,
}

fn fail(status: Status) -> IoOutcome {
    IoOutcome { status, data: None }
}

/// Executes one NVM command on `ns`. `data` is the host's data (already
/// received in full) for commands that carry some.
pub async fn execute(ns: &NsChannel, sqe: &Sqe, sgl: DataSgl, data: Option<IoBufMut>) -> IoOutcome {
    let v = ns.chan.volume();
    let bs = v.block_size();
    let nsze = v.num_blocks();
    match NvmOpcode::from_u8(sqe.opcode) {
        Some(NvmOpcode::Read) | Some(NvmOpcode::Write) => {
            let rw = RwCommand::from_sqe(sqe);
            if let Err(s) = rw.check_range(nsze) {
                return fail(s);
            }
            if let Err(s) = rw.check_transfer(bs, sgl) {
                return fail(s);
            }
            let (Some(off), Some(len)) = (rw.offset(bs), rw.byte_len(bs)) else {
                return fail(Status::LBA_OUT_OF_RANGE.with_dnr());
            };
            let Ok(len) = usize::try_from(len.0) else {
                return fail(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
            };
            if sqe.opcode == NvmOpcode::Read.as_u8() {
                let Some(buf) = alloc_wait(len).await else {
                    return fail(Status::COMMAND_INTERRUPTED);
                };
                let (r, buf) = ns.chan.read(off, buf).await;
                match r {
                    Ok(()) => IoOutcome {
                        status: Status::SUCCESS,
                        data: Some(buf.freeze()),
                    },
                    Err(e) => fail(volume_status(&e, Dir::Read)),
                }
            } else {
                let Some(buf) = data else {
                    return fail(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
                };
                if buf.len() != len {
                    return fail(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
                }
                let (r, _buf) = if rw.fua {
                    ns.chan.write_fua(off, buf.freeze()).await
                } else {
                    ns.chan.write(off, buf.freeze()).await
                };
                match r {
                    Ok(()) => fail(Status::SUCCESS),
                    Err(e) => fail(volume_status(&e, Dir::Write)),
                }
            }
        }
        Some(NvmOpcode::Flush) => match ns.chan.flush().await {
            Ok(()) => fail(Status::SUCCESS),
            Err(e) => fail(volume_status(&e, Dir::None)),
        },
        Some(NvmOpcode::WriteZeroes) => {
            let rw = RwCommand::from_sqe(sqe);
            if let Err(s) = rw.check_range(nsze) {
                return fail(s);
            }
            let (Some(off), Some(len)) = (rw.offset(bs), rw.byte_len(bs)) else {
                return fail(Status::LBA_OUT_OF_RANGE.with_dnr());
            };
            let r = if rw.deac {
                ns.chan.unmap(off, len).await
            } else {
                ns.chan.write_zeroes(off, len).await
            };
            match r {
                Ok(()) => fail(Status::SUCCESS),
                Err(e) => fail(volume_status(&e, Dir::Write)),
            }
        }
        Some(NvmOpcode::DatasetManagement) => {
            let dsm = DsmCommand::from_sqe(sqe);
            let bytes: &[u8] = data.as_deref().unwrap_or(&[]);
            let ranges = match dsm.parse_ranges(bytes) {
                Ok(r) => r,
                Err(s) => return fail(s),
            };
            if !dsm.deallocate {
                // Only hints otherwise: nothing to do.
                return fail(Status::SUCCESS);
            }
            for r in &ranges {
                if r.nlb == 0 {
                    continue;
                }
                let in_range = r
                    .slba
                    .0
                    .checked_add(u64::from(r.nlb))
                    .is_some_and(|end| end <= nsze);
                if !in_range {
                    return fail(Status::LBA_OUT_OF_RANGE.with_dnr());
                }
            }
            for r in ranges.iter().filter(|r| r.nlb > 0) {
                let (Some(off), Some(len)) = (bs.offset_of(r.slba), bs.len_of(u64::from(r.nlb)))
                else {
                    return fail(Status::LBA_OUT_OF_RANGE.with_dnr());
                };
                if let Err(e) = ns.chan.unmap(ByteOffset(off.0), ByteLen(len.0)).await {
                    return fail(volume_status(&e, Dir::None));
                }
            }
            fail(Status::SUCCESS)
        }
        _ => fail(Status::INVALID_OPCODE.with_dnr()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_errors_map_to_nvme_status() {
        let oor = VolumeError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(
            volume_status(&oor, Dir::Read),
            Status::LBA_OUT_OF_RANGE.with_dnr()
        );
        let mis = VolumeError::Misaligned {
            offset: 1,
            len: 1,
            block_size: 512,
        };
        assert_eq!(
            volume_status(&mis, Dir::Write),
            Status::INVALID_FIELD.with_dnr()
        );
        assert_eq!(
            volume_status(&VolumeError::NoBuffer, Dir::Read),
            Status::COMMAND_INTERRUPTED
        );
        let eio = || VolumeError::Io(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(
            volume_status(&eio(), Dir::Read),
            Status::UNRECOVERED_READ_ERROR
        );
        assert_eq!(volume_status(&eio(), Dir::Write), Status::WRITE_FAULT);
        assert_eq!(volume_status(&eio(), Dir::None), Status::INTERNAL_ERROR);
        let nospc = VolumeError::Io(io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            volume_status(&nospc, Dir::Write),
            Status::CAPACITY_EXCEEDED.with_dnr()
        );
        let eof = VolumeError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "eof"));
        assert_eq!(volume_status(&eof, Dir::Read), Status::DATA_TRANSFER_ERROR);
    }
}
