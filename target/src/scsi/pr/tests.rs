//! The persistent reservation state machine: registration rules, the
//! conflict matrix for each type, ownership on unregister (the libiscsi
//! ProutReserve.Ownership* scenarios), PREEMPT / CLEAR with their unit
//! attentions, and PERSISTENT RESERVE IN data.

use super::kind::*;
use super::*;

fn nx(i: &str) -> Nexus {
    Nexus {
        initiator_port: format!("iqn.2026-11.test:{i},i,0x000000000001"),
        target_port: "iqn.2026-11.io.mirrorpoint:t,t,0x0001".into(),
        relative_port: 1,
    }
}

fn params(key: u64, sa_key: u64) -> ProutParams {
    ProutParams {
        key,
        sa_key,
        spec_i_pt: false,
        all_tg_pt: false,
        aptpl: false,
    }
}

fn ok(pr: &mut PrState, n: &Nexus, sa: u8, t: u8, key: u64, sa_key: u64) -> Vec<UaTarget> {
    pr.prout(n, sa, t, &params(key, sa_key))
        .unwrap_or_else(|e| panic!("sa {sa} type {t}: {e:?}"))
}

fn fails(pr: &mut PrState, n: &Nexus, sa: u8, t: u8, key: u64, sa_key: u64) -> Fail {
    let before = (
        pr.generation,
        pr.registrations.clone(),
        pr.reservation.clone(),
    );
    let e = pr
        .prout(n, sa, t, &params(key, sa_key))
        .expect_err("should fail");
    assert_eq!(
        before,
        (
            pr.generation,
            pr.registrations.clone(),
            pr.reservation.clone()
        ),
        "a failed PROUT changed state"
    );
    e
}

#[test]
fn register_rules() {
    let (a, b) = (nx("a"), nx("b"));
    let mut pr = PrState::default();
    // Unregistered with a non-zero reservation key: conflict.
    assert_eq!(fails(&mut pr, &a, sa::REGISTER, 0, 5, 1), Fail::Conflict);
    ok(&mut pr, &a, sa::REGISTER, 0, 0, 0x11);
    assert_eq!(pr.generation, 2 - 1);
    ok(&mut pr, &b, sa::REGISTER_AND_IGNORE, 0, 999, 0x22);
    assert_eq!(pr.registrations.len(), 2);
    // Wrong key on a registered nexus: conflict; right key changes it.
    assert_eq!(
        fails(&mut pr, &a, sa::REGISTER, 0, 0x12, 0x13),
        Fail::Conflict
    );
    ok(&mut pr, &a, sa::REGISTER, 0, 0x11, 0x13);
    assert_eq!(pr.registration(&a).map(|r| r.key), Some(0x13));
    // Ignore-existing replaces whatever key.
    ok(&mut pr, &a, sa::REGISTER_AND_IGNORE, 0, 0, 0x14);
    assert_eq!(pr.registration(&a).map(|r| r.key), Some(0x14));
    // Unregister.
    ok(&mut pr, &a, sa::REGISTER, 0, 0x14, 0);
    assert!(pr.registration(&a).is_none());
    // APTPL and SPEC_I_PT are refused honestly.
    let mut p = params(0, 1);
    p.aptpl = true;
    assert!(
        matches!(pr.prout(&a, sa::REGISTER, 0, &p), Err(Fail::Check(s)) if s.asc == Asc::INVALID_FIELD_IN_PARAMETER_LIST)
    );
    let mut p = params(0, 1);
    p.spec_i_pt = true;
    assert!(matches!(
        pr.prout(&a, sa::REGISTER, 0, &p),
        Err(Fail::Check(_))
    ));
    // REGISTER AND MOVE is rejected as an unsupported service action.
    assert!(matches!(
        pr.prout(&b, sa::REGISTER_AND_MOVE, 0, &params(0x22, 1)),
        Err(Fail::Check(s)) if s.asc == Asc::INVALID_FIELD_IN_CDB
    ));
}

#[test]
fn reserve_requires_registration_and_valid_type() {
    let (a, b) = (nx("a"), nx("b"));
    let mut pr = PrState::default();
    assert_eq!(fails(&mut pr, &a, sa::RESERVE, 1, 0, 0), Fail::Conflict);
    ok(&mut pr, &a, sa::REGISTER, 0, 0, 1);
    assert_eq!(fails(&mut pr, &a, sa::RESERVE, 1, 2, 0), Fail::Conflict);
    for bad in [0u8, 2, 4, 9, 15] {
        assert!(
            matches!(fails(&mut pr, &a, sa::RESERVE, bad, 1, 0), Fail::Check(s) if s.asc == Asc::INVALID_FIELD_IN_CDB)
        );
    }
    // Scope other than LU.
    assert!(matches!(
        fails(&mut pr, &a, sa::RESERVE, 0x21, 1, 0),
        Fail::Check(_)
    ));
    ok(&mut pr, &a, sa::RESERVE, WRITE_EXCLUSIVE, 1, 0);
    // Same type again: GOOD; another type: conflict.
    ok(&mut pr, &a, sa::RESERVE, WRITE_EXCLUSIVE, 1, 0);
    assert_eq!(
        fails(&mut pr, &a, sa::RESERVE, EXCLUSIVE_ACCESS, 1, 0),
        Fail::Conflict
    );
    ok(&mut pr, &b, sa::REGISTER, 0, 0, 2);
    assert_eq!(
        fails(&mut pr, &b, sa::RESERVE, WRITE_EXCLUSIVE, 2, 0),
        Fail::Conflict
    );
    // RESERVE and RELEASE do not bump the generation.
    let g = pr.generation;
    ok(&mut pr, &b, sa::RELEASE, WRITE_EXCLUSIVE, 2, 0); // not holder: no-op
    assert!(pr.reservation.is_some());
    assert!(
        matches!(fails(&mut pr, &a, sa::RELEASE, EXCLUSIVE_ACCESS, 1, 0), Fail::Check(s) if s.asc == Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    );
    ok(&mut pr, &a, sa::RELEASE, WRITE_EXCLUSIVE, 1, 0);
    assert!(pr.reservation.is_none());
    assert_eq!(pr.generation, g);
}

/// The SPC-4 conflict table for each type: holder, registered non-holder,
/// unregistered, for reads and writes.
#[test]
fn conflict_matrix() {
    let (h, r, u) = (nx("holder"), nx("registered"), nx("unregistered"));
    // (type, registered reads ok, registered writes ok, unregistered reads ok)
    let table = [
        (WRITE_EXCLUSIVE, true, false, true),
        (EXCLUSIVE_ACCESS, false, false, false),
        (WRITE_EXCLUSIVE_RO, true, true, true),
        (EXCLUSIVE_ACCESS_RO, true, true, false),
        (WRITE_EXCLUSIVE_AR, true, true, true),
        (EXCLUSIVE_ACCESS_AR, true, true, false),
    ];
    for (t, reg_read, reg_write, unreg_read) in table {
        let mut pr = PrState::default();
        ok(&mut pr, &h, sa::REGISTER, 0, 0, 1);
        ok(&mut pr, &r, sa::REGISTER, 0, 0, 2);
        ok(&mut pr, &h, sa::RESERVE, t, 1, 0);
        for a in [Access::Always, Access::Read, Access::Write] {
            assert!(!pr.conflicts(&h, a), "holder {t} {a:?}");
            assert!(!pr.conflicts(&u, Access::Always));
        }
        assert_eq!(
            pr.conflicts(&r, Access::Read),
            !reg_read,
            "registered read, type {t}"
        );
        assert_eq!(
            pr.conflicts(&r, Access::Write),
            !reg_write,
            "registered write, type {t}"
        );
        assert_eq!(
            pr.conflicts(&u, Access::Read),
            !unreg_read,
            "unregistered read, type {t}"
        );
        assert!(
            pr.conflicts(&u, Access::Write),
            "unregistered write, type {t}"
        );
    }
    // No reservation: nothing conflicts.
    let pr = PrState::default();
    assert!(!pr.conflicts(&u, Access::Write));
}

/// libiscsi ProutReserve.Ownership*: the holder unregisters; the
/// reservation goes away unless it is an all-registrants one.
#[test]
fn ownership_on_unregister() {
    let (a, b) = (nx("a"), nx("b"));
    for t in [
        WRITE_EXCLUSIVE,
        EXCLUSIVE_ACCESS,
        WRITE_EXCLUSIVE_RO,
        EXCLUSIVE_ACCESS_RO,
        WRITE_EXCLUSIVE_AR,
        EXCLUSIVE_ACCESS_AR,
    ] {
        let mut pr = PrState::default();
        ok(&mut pr, &a, sa::REGISTER_AND_IGNORE, 0, 0, 0xa);
        ok(&mut pr, &b, sa::REGISTER_AND_IGNORE, 0, 0, 0xb);
        ok(&mut pr, &a, sa::RESERVE, t, 0xa, 0);
        let rr = pr.prin(1).expect("read reservation");
        let key = u64::from_be_bytes(rr[8..16].try_into().expect("8"));
        assert_eq!(key, if t >= 7 { 0 } else { 0xa }, "type {t}");
        assert_eq!(rr[21], t);
        let ua = ok(&mut pr, &a, sa::REGISTER, 0, 0xa, 0);
        if t >= 7 {
            assert!(pr.reservation.is_some(), "AR type {t} survives");
            assert!(pr.is_holder(&b));
            ok(&mut pr, &b, sa::RELEASE, t, 0xb, 0);
        } else {
            assert!(pr.reservation.is_none(), "type {t} released");
            // Registrants-only: the others learn it was released.
            assert_eq!(!ua.is_empty(), t == 5 || t == 6, "type {t}: {ua:?}");
        }
        ok(&mut pr, &b, sa::REGISTER, 0, 0xb, 0);
        assert!(pr.registrations.is_empty());
        assert_eq!(pr.prin(1).expect("rr")[4..8], [0, 0, 0, 0]);
    }
}

#[test]
fn preempt_and_clear() {
    let (a, b, c) = (nx("a"), nx("b"), nx("c"));
    let mut pr = PrState::default();
    ok(&mut pr, &a, sa::REGISTER, 0, 0, 1);
    ok(&mut pr, &b, sa::REGISTER, 0, 0, 2);
    ok(&mut pr, &c, sa::REGISTER, 0, 0, 3);
    // No reservation: PREEMPT removes the registrations with that key.
    let ua = ok(&mut pr, &a, sa::PREEMPT, WRITE_EXCLUSIVE, 1, 3);
    assert_eq!(ua.len(), 1);
    assert_eq!(ua[0].asc, Asc::REGISTRATIONS_PREEMPTED);
    assert!(pr.registration(&c).is_none());
    assert!(pr.reservation.is_none());
    // A key nobody has: conflict. Zero key without reservation: invalid.
    assert_eq!(
        fails(&mut pr, &a, sa::PREEMPT, WRITE_EXCLUSIVE, 1, 77),
        Fail::Conflict
    );
    assert!(matches!(
        fails(&mut pr, &a, sa::PREEMPT, WRITE_EXCLUSIVE, 1, 0),
        Fail::Check(_)
    ));
    // B reserves; A preempts B's reservation and takes it with a new type.
    ok(&mut pr, &b, sa::RESERVE, EXCLUSIVE_ACCESS, 2, 0);
    let g = pr.generation;
    let ua = ok(&mut pr, &a, sa::PREEMPT_AND_ABORT, WRITE_EXCLUSIVE, 1, 2);
    assert!(pr.generation > g);
    assert!(pr.is_holder(&a));
    assert_eq!(
        pr.reservation.as_ref().map(|r| r.rtype),
        Some(WRITE_EXCLUSIVE)
    );
    assert!(pr.registration(&b).is_none());
    assert!(ua
        .iter()
        .any(|u| u.initiator == b.initiator_port && u.asc == Asc::REGISTRATIONS_PREEMPTED));
    // All-registrants with zero key: everyone else is removed.
    let mut pr = PrState::default();
    ok(&mut pr, &a, sa::REGISTER, 0, 0, 1);
    ok(&mut pr, &b, sa::REGISTER, 0, 0, 2);
    ok(&mut pr, &c, sa::REGISTER, 0, 0, 3);
    ok(&mut pr, &b, sa::RESERVE, WRITE_EXCLUSIVE_AR, 2, 0);
    let ua = ok(&mut pr, &a, sa::PREEMPT, EXCLUSIVE_ACCESS, 1, 0);
    assert_eq!(ua.len(), 2);
    assert_eq!(pr.registrations.len(), 1);
    assert_eq!(
        pr.reservation.as_ref().map(|r| r.rtype),
        Some(EXCLUSIVE_ACCESS)
    );
    // CLEAR: everything goes, the others get RESERVATIONS PREEMPTED.
    ok(&mut pr, &b, sa::REGISTER, 0, 0, 2);
    assert_eq!(fails(&mut pr, &b, sa::CLEAR, 0, 9, 0), Fail::Conflict);
    let ua = ok(&mut pr, &b, sa::CLEAR, 0, 2, 0);
    assert_eq!(ua.len(), 1);
    assert_eq!(ua[0].asc, Asc::RESERVATIONS_PREEMPTED);
    assert!(pr.registrations.is_empty() && pr.reservation.is_none());
}

#[test]
fn prin_data() {
    let (a, b) = (nx("a"), nx("b"));
    let mut pr = PrState::default();
    ok(&mut pr, &a, sa::REGISTER, 0, 0, 0x1122);
    let mut p = params(0, 0x3344);
    p.all_tg_pt = true;
    pr.prout(&b, sa::REGISTER, 0, &p).expect("all tg pt");
    ok(&mut pr, &a, sa::RESERVE, EXCLUSIVE_ACCESS_RO, 0x1122, 0);
    let keys = pr.prin(0).expect("read keys");
    assert_eq!(&keys[0..4], &pr.generation.to_be_bytes());
    assert_eq!(&keys[4..8], &[0, 0, 0, 16]);
    assert_eq!(&keys[8..16], &0x1122u64.to_be_bytes());
    assert_eq!(&keys[16..24], &0x3344u64.to_be_bytes());
    let caps = pr.prin(2).expect("caps");
    assert_eq!(caps.len(), 8);
    assert_eq!(caps[2] & 0x01, 0, "PTPL_C is not claimed");
    assert_eq!(caps[2] & 0x04, 0x04, "ATP_C");
    let full = pr.prin(3).expect("full status");
    let len = u32::from_be_bytes(full[4..8].try_into().expect("4")) as usize;
    assert_eq!(full.len(), 8 + len);
    // First descriptor: A is the holder.
    assert_eq!(full[8 + 12], 0x01);
    assert_eq!(full[8 + 13], EXCLUSIVE_ACCESS_RO);
    let tid_len = u32::from_be_bytes(full[8 + 20..8 + 24].try_into().expect("4")) as usize;
    assert_eq!(full[8 + 24], 0x45, "iSCSI TransportID with ISID");
    assert!(tid_len % 4 == 0);
    // Second: B with ALL_TG_PT, not a holder.
    let second = 8 + 24 + tid_len;
    assert_eq!(full[second + 12], 0x02);
    for s in 4..32 {
        assert!(pr.prin(s).is_none());
    }
}

#[test]
fn spc2_reserve_release() {
    let (a, b) = (nx("a"), nx("b"));
    let mut s = Spc2::default();
    s.reserve(&a).expect("reserve");
    s.reserve(&a).expect("again");
    assert_eq!(s.reserve(&b), Err(Fail::Conflict));
    s.release(&b);
    assert!(s.blocks(&b));
    s.release(&a);
    s.reserve(&b).expect("b now");
}
