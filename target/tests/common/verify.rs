//! What `mirror_verify` should report: the out-of-sync ranges expected for
//! ranges corrupted behind the mirror's back.

use serde_json::{json, Value};

/// The `region`-aligned, merged ranges covering the given byte ranges, as
/// `out_of_sync` entries of leg 0.
pub fn expected(ranges: &[(u64, u64)], region: u64) -> Vec<Value> {
    let mut regions: Vec<u64> = ranges
        .iter()
        .flat_map(|&(o, l)| (o / region)..(o + l).div_ceil(region))
        .collect();
    regions.sort_unstable();
    regions.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in regions {
        match out.last_mut() {
            Some((s, n)) if *s + *n == r => *n += 1,
            _ => out.push((r, 1)),
        }
    }
    out.into_iter()
        .map(|(s, n)| json!({"offset": s * region, "length": n * region, "legs": [0]}))
        .collect()
}
