//! Host I/O through an in-process daemon's volume API (run on one of its
//! reactors), for tests that write, read back or flush a volume directly,
//! plus the tests' xorshift generator for offsets and sizes.

use super::Site;
use mirrorpoint_poller::buffer_pool;
use mirrorpoint_target::units::ByteOffset;

/// Flushes volume `name` on reactor 0 (reaching every live leg).
pub fn flush(site: &Site, name: &str) {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get(name).unwrap();
    st.reactors[0]
        .block_on(move || async move { vol.channel().flush().await.expect("flush") })
        .unwrap();
}

/// One write through the volume API on reactor `core`; the data is `fill`.
/// Panics if the write fails.
pub fn write_sync(site: &Site, core: usize, name: &str, offset: u64, len: usize, fill: u8) {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get(name).unwrap();
    st.reactors[core]
        .block_on(move || async move {
            let mut b = buffer_pool().alloc(len).expect("buffer");
            b.fill(fill);
            vol.channel()
                .write(ByteOffset(offset), b.freeze())
                .await
                .0
                .expect("mirrored write")
        })
        .unwrap();
}

/// One write of `fill` on reactor 1; the error as a string if it fails.
pub fn write_volume(
    site: &Site,
    name: &str,
    offset: u64,
    len: usize,
    fill: u8,
) -> Result<(), String> {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get(name).expect("volume exists");
    st.reactors[1]
        .block_on(move || async move {
            let mut b = buffer_pool().alloc(len).expect("buffer");
            b.fill(fill);
            vol.channel()
                .write(ByteOffset(offset), b.freeze())
                .await
                .0
                .map_err(|e| e.to_string())
        })
        .unwrap()
}

/// Reads the first `size` bytes of volume `name` on reactor 0, a pool
/// chunk at a time.
pub fn read_volume(site: &Site, name: &str, size: u64) -> Vec<u8> {
    let st = site.daemon.as_ref().unwrap().state().clone();
    let vol = st.volumes.get(name).expect("volume exists");
    st.reactors[0]
        .block_on(move || async move {
            let ch = vol.channel();
            let chunk = buffer_pool().chunk_size() as u64;
            let mut out = Vec::with_capacity(size as usize);
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                let b = buffer_pool().alloc(n as usize).expect("buffer");
                let (r, b) = ch.read(ByteOffset(off), b).await;
                r.expect("read");
                out.extend_from_slice(&b);
                off += n;
            }
            out
        })
        .unwrap()
}

pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}
