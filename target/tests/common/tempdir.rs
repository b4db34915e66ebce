//! A per-test scratch directory under the system temp dir, named after the
//! test and the process, removed on drop (kept when `MP_KEEP` is set, to
//! look at what a failing test left behind).

use std::path::PathBuf;

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("mp-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("MP_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
