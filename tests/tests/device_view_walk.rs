//! A seeded random walk over maps, unmaps, extents, preempted batches,
//! hooks, IOMMU failures, drains, contexts and domid reuse, with a DMA
//! check of every BFN ever handed out after each quiescent step (so a
//! stale IOTLB entry or a missed table entry is seen by the device, which
//! `check_invariants`' walk of the tables does not see), and a check of the
//! target gates against the cells' books. Written by a security review
//! (2026-12-05). `DEVICE_WALK_SEEDS` / `DEVICE_WALK_STEPS` size a longer
//! run; `DEVICE_WALK_ONLY` replays one seed.

use pviommu_abi::{Bfn, ContextId, DomId, Gfn, Permissions, PvIommuOp, Request};
use pviommu_hv::engine::{GfnChange, Slot};
use pviommu_hv::sim::{DomainSpec, Format, SimMachine};
use pviommu_hv::Engine;
use pviommu_tests::*;
use std::collections::BTreeSet;

const GUEST_PAGES: u64 = 1024;

fn stamp(m: &mut SimMachine, d: DomId, pages: u64) {
    for g in 0..pages {
        if let Some(mfn) = m.mfn_of(d, Gfn(g)) {
            let _ = m.write_guest(d, Gfn(g), 64, &mfn.0.to_le_bytes());
        }
    }
}

fn dma_stamp(m: &mut SimMachine, owner: DomId, ctx: ContextId, bfn: Bfn) -> Option<u64> {
    m.dma_read(owner, ctx, (bfn.0 << 12) + 64, 8)
        .ok()
        .map(|v| u64::from_le_bytes(v.try_into().unwrap()))
}

/// Every BFN ever handed out, checked through the device (IOTLB first).
fn dma_check(
    m: &mut SimMachine,
    e: &Engine,
    seen: &BTreeSet<(DomId, ContextId, u64)>,
    in_flight: bool,
) -> Result<(), String> {
    // What the books say of each.
    let mut want = Vec::new();
    {
        let st = e.state();
        let mut cells = std::collections::BTreeMap::new();
        for dd in st.drivers() {
            let slots: Vec<Slot> = dd.slots().map(|(_, s)| s).collect();
            cells.insert((dd.domid(), dd.context()), slots);
        }
        for &(owner, ctx, bfn) in seen {
            let slot = cells.get(&(owner, ctx)).and_then(|v| {
                let idx = st.space().index_of(Bfn(bfn))?;
                v.get(idx as usize).copied()
            });
            want.push((owner, ctx, bfn, slot));
        }
    }
    for (owner, ctx, bfn, slot) in want {
        let got = dma_stamp(m, owner, ctx, Bfn(bfn));
        match slot {
            Some(Slot::Live(map)) => {
                if got != Some(map.mfn.0) && !(in_flight && got.is_none()) {
                    return Err(format!(
                        "live {owner:?}/{ctx:?} bfn {bfn:#x}: device reads {got:?}, mapping says {:#x}",
                        map.mfn.0
                    ));
                }
            }
            Some(Slot::Unmapping { mapping, .. }) | Some(Slot::Stuck { mapping, .. }) => {
                if got.is_some_and(|g| g != mapping.mfn.0) {
                    return Err(format!(
                        "unmapping {owner:?}/{ctx:?} bfn {bfn:#x} reaches {got:?}, not its frame"
                    ));
                }
            }
            other => {
                if let Some(g) = got {
                    let info = m.frame_info(pviommu_hv::Mfn(g)).map(|i| (i.owner, i.refs));
                    return Err(format!(
                        "{other:?} {owner:?}/{ctx:?} bfn {bfn:#x}: the device still reaches frame {g:#x} {info:?}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Each target's gate: its share count is the entries holding its pages,
/// and each cell holding one has its bit.
fn gate_check(e: &Engine, targets: &[DomId]) -> Result<(), String> {
    for &t in targets {
        let st = e.state();
        let mut held = 0u32;
        let mut cells = BTreeSet::new();
        for dd in st.drivers() {
            for (_, s) in dd.slots() {
                let m = match s {
                    Slot::Live(m) => m,
                    Slot::Unmapping { mapping, .. } | Slot::Stuck { mapping, .. } => mapping,
                    _ => continue,
                };
                if m.domid == t {
                    held += 1;
                    cells.insert((dd.domid(), dd.context()));
                }
            }
        }
        let (active, mask) = (e.target_active(t), e.target_drivers(t));
        drop(st);
        if active != held {
            return Err(format!("{t:?}: active {active}, entries {held}"));
        }
        for (d, c) in cells {
            let cell = e.cell_of(d, c).ok_or("no cell")?;
            if mask & (1u128 << cell) == 0 {
                return Err(format!(
                    "{t:?}: cell {cell} ({d:?}/{c:?}) holds an entry, no bit"
                ));
            }
        }
    }
    Ok(())
}

fn run(seed: u64, format: Format, steps: usize) -> Result<(), String> {
    let (mut m, e) = machine_after_dom0(format, GUEST_PAGES, 512);
    let mut rng = Rng(seed | 1);
    let mut seen: BTreeSet<(DomId, ContextId, u64)> = BTreeSet::new();
    let mut own: Option<ContextId> = None;
    // A preempted batch of dom0's: its ops and how far it got.
    let mut pending: Option<(Vec<PvIommuOp>, u32)> = None;
    stamp(&mut m, GUEST, GUEST_PAGES);
    stamp(&mut m, STRANGER, 32);
    let mut log = Vec::new();
    for step in 0..steps {
        let k = rng.next() % 23;
        let g = rng.next() % 48 + if rng.next().is_multiple_of(4) { 512 } else { 0 };
        let target = if rng.next().is_multiple_of(5) {
            STRANGER
        } else {
            GUEST
        };
        let g = if target == STRANGER { g % 32 } else { g };
        let write = rng.next().is_multiple_of(2);
        let perms = if write {
            Permissions::RW
        } else {
            Permissions::RO
        };
        let caller = if rng.next().is_multiple_of(3) && target == GUEST {
            DEVICE_MODEL
        } else {
            DomId::DOM0
        };
        let ctx = match own {
            Some(c) if caller == DomId::DOM0 && rng.next().is_multiple_of(3) => c,
            _ => ContextId::DEFAULT,
        };
        log.push(format!(
            "{step}: k={k} g={g} t={target:?} w={write} c={caller:?} ctx={ctx:?}"
        ));
        match k {
            0..=4 => {
                // A run of maps (consecutive or falling gfns).
                let n = rng.next() % 6 + 1;
                let down = rng.next().is_multiple_of(2);
                let mut ops: Vec<_> = (0..n)
                    .map(|i| {
                        let gg = if down { g + n - 1 - i } else { g + i };
                        map_op_in(ctx, target, gg, perms)
                    })
                    .collect();
                if pending.is_none() || caller != DomId::DOM0 {
                    let _ = m.guest_batch_all(&e, caller, &mut ops);
                    for op in &ops {
                        if op.status == 0 {
                            seen.insert((caller, ctx, op.bfn));
                        }
                    }
                }
            }
            5 => {
                // Unmap some BFN the caller holds.
                let mine: Vec<_> = seen.iter().filter(|s| s.0 == caller).copied().collect();
                if !mine.is_empty() && (pending.is_none() || caller != DomId::DOM0) {
                    let (_, c, b) = mine[(rng.next() % mine.len() as u64) as usize];
                    let mut ops = [unmap_op_in(c, Bfn(b))];
                    let _ = m.guest_batch_all(&e, caller, &mut ops);
                }
            }
            6 => {
                // Several unmaps then maps in one batch, preempted after its
                // first op (dom0, context 0): left in flight.
                if pending.is_none() {
                    let mine: Vec<_> = seen
                        .iter()
                        .filter(|s| s.0 == DomId::DOM0 && s.1 == ContextId::DEFAULT)
                        .copied()
                        .collect();
                    let mut ops = Vec::new();
                    for i in 0..3 {
                        if !mine.is_empty() {
                            let (_, c, b) = mine[((rng.next() + i) % mine.len() as u64) as usize];
                            ops.push(unmap_op_in(c, Bfn(b)));
                        }
                    }
                    for i in 0..4 {
                        ops.push(map_op_in(ContextId::DEFAULT, target, g + i, perms));
                    }
                    m.preempt_budget = Some(0);
                    let r = m.guest_batch(&e, DomId::DOM0, &mut ops, 0);
                    m.preempt_budget = None;
                    if let Ok((1, done)) = r {
                        pending = Some((ops, done));
                    } else {
                        for op in &ops {
                            if op.status == 0 && Request::parse_map(op).is_some() {
                                seen.insert((DomId::DOM0, ContextId::DEFAULT, op.bfn));
                            }
                        }
                    }
                }
            }
            7 => {
                // Resume the preempted batch, to its end.
                if let Some((mut ops, mut done)) = pending.take() {
                    while let Ok((1, d)) = m.guest_batch(&e, DomId::DOM0, &mut ops, done) {
                        done = d;
                    }
                    for op in &ops {
                        if op.status == 0 && Request::parse_map(op).is_some() {
                            seen.insert((DomId::DOM0, ContextId::DEFAULT, op.bfn));
                        }
                    }
                }
            }
            8 => {
                if m.balloon_out(&e, target, Gfn(g)).is_ok() {
                    let _ = m.put_new_frame(target, Gfn(g));
                }
            }
            9 => {
                if m.mfn_of(target, Gfn(g)).is_some() {
                    let _ = m.replace_page(&e, target, Gfn(g));
                }
            }
            10 => m.make_read_only(&e, target, Gfn(g)),
            11 => {
                // A range change.
                let order = (rng.next() % 10) as u32;
                let first = g & !((1u64 << order) - 1);
                let removed = rng.next().is_multiple_of(2);
                let pages = if target == STRANGER { 32 } else { GUEST_PAGES };
                for x in first..(first + (1u64 << order)).min(pages) {
                    if removed {
                        let _ = m.put_new_frame(target, Gfn(x));
                    } else {
                        m.set_read_only(target, Gfn(x));
                    }
                }
                let how = if removed {
                    GfnChange::Removed
                } else {
                    GfnChange::WriteLost
                };
                e.gfn_changed(&mut m, target, Gfn(first), order, how);
            }
            12 => m.fail_unmaps = (rng.next() % 3) as u32,
            13 => m.fail_flushes = (rng.next() % 2) as u32,
            14 => {
                // Drain the caller's notices (numbered acks).
                for _ in 0..200 {
                    match revoked_next_numbered(&mut m, &e, caller) {
                        Ok((bfn, n)) => {
                            let st = e.state();
                            let ctx = st
                                .cells_of(caller)
                                .find(|dd| {
                                    st.space().index_of(bfn).is_some_and(|i| {
                                        matches!(
                                            dd.slots().nth(i as usize).map(|x| x.1),
                                            Some(Slot::Revoked { .. })
                                        )
                                    })
                                })
                                .map(|dd| dd.context())
                                .unwrap_or(ContextId::DEFAULT);
                            drop(st);
                            let mut ack = [Request::RevokedAck {
                                context: ctx,
                                bfn,
                                notice: Some(n),
                            }
                            .encode()];
                            let _ = m.guest_batch_all(&e, caller, &mut ack);
                        }
                        Err(_) => break,
                    }
                }
            }
            15 => {
                // An extent (context 0, or dom0's own context).
                if pending.is_none() || caller != DomId::DOM0 {
                    let req = map_request_in(ctx, GUEST, 512, perms);
                    let mut ops = [Request::MapExtent(req).encode()];
                    let _ = m.guest_batch_all(&e, caller, &mut ops);
                    if ops[0].status == 0 {
                        for i in 0..512 {
                            seen.insert((caller, ctx, ops[0].bfn + i));
                        }
                    }
                }
            }
            16 => {
                // Unmap an extent's BFNs (any aligned 512 the caller holds).
                let mine: Vec<_> = seen
                    .iter()
                    .filter(|s| s.0 == caller && s.2 % 512 == 0)
                    .copied()
                    .collect();
                if !mine.is_empty() && (pending.is_none() || caller != DomId::DOM0) {
                    let (_, c, b) = mine[(rng.next() % mine.len() as u64) as usize];
                    let mut ops = [Request::UnmapExtent {
                        context: c,
                        bfn: Bfn(b),
                    }
                    .encode()];
                    let _ = m.guest_batch_all(&e, caller, &mut ops);
                }
            }
            17 => {
                if own.is_none() {
                    own = e.context_create(&mut m, DomId::DOM0).ok();
                }
            }
            18 => {
                if let Some(c) = own {
                    if e.context_destroy(&mut m, DomId::DOM0, c).is_ok() {
                        own = None;
                    }
                }
            }
            19 => {
                // The guest dies and a new one takes its domid.
                {
                    m.kill_domain(&e, GUEST);
                    if e.target_drivers(GUEST) != 0 || e.target_active(GUEST) != 0 {
                        return Err(format!(
                            "dead guest: bits {:#x} active {}",
                            e.target_drivers(GUEST),
                            e.target_active(GUEST)
                        ));
                    }
                    m.create_domain(
                        GUEST,
                        DomainSpec {
                            pages: GUEST_PAGES,
                            privileged: false,
                            device_model_of: None,
                        },
                    )
                    .unwrap();
                    stamp(&mut m, GUEST, GUEST_PAGES);
                }
            }
            20 => {
                // The device model dies and comes back.
                let slices = m.kill_domain(&e, DEVICE_MODEL);
                let st = e.state();
                if let Some(dd) = st.cells_of(DEVICE_MODEL).next() {
                    let desc = format!(
                        "seed {seed:#x} step {step}: dead device model keeps a cell ({slices} slices): ctx {:?} used {} live {} revoked {} stuck {} contexts {:?} slots {:?}\n{}",
                        dd.context(), dd.used(), dd.live(), dd.revoked(), dd.stuck(),
                        dd.contexts().collect::<Vec<_>>(),
                        dd.slots().filter(|(_, s)| !matches!(s, Slot::Free { .. })).take(8).collect::<Vec<_>>(),
                        log.iter().rev().take(14).rev().cloned().collect::<Vec<_>>().join("\n")
                    );
                    return Err(desc);
                }
                drop(st);
                seen.retain(|s| s.0 != DEVICE_MODEL);
                m.create_domain(
                    DEVICE_MODEL,
                    DomainSpec {
                        pages: 32,
                        privileged: false,
                        device_model_of: Some(GUEST),
                    },
                )
                .unwrap();
            }
            21 => {
                // Log-dirty on (slices) and off again.
                m.enable_log_dirty(&e, target);
                m.set_log_dirty_mode(target, false);
            }
            _ => {
                m.fail_table_allocs(Some(rng.next() % 3));
            }
        }
        stamp(&mut m, GUEST, GUEST_PAGES);
        stamp(&mut m, STRANGER, 32);
        if k != 22 {
            m.fail_table_allocs(None);
        }
        if pending.is_some() {
            let r = dma_check(&mut m, &e, &seen, true)
                .and_then(|()| gate_check(&e, &[GUEST, STRANGER]));
            if let Err(err) = r {
                let tail = log.iter().rev().take(12).rev().cloned().collect::<Vec<_>>();
                return Err(format!(
                    "seed {seed:#x} step {step} (in flight): {err}\n{}",
                    tail.join("\n")
                ));
            }
        }
        if pending.is_none() {
            // Settle injected failures' leftovers (stuck, failed flushes).
            m.fail_table_allocs(None);
            let (fu, ff) = (m.fail_unmaps, m.fail_flushes);
            m.fail_unmaps = 0;
            m.fail_flushes = 0;
            for d in [DomId::DOM0, DEVICE_MODEL] {
                for _ in 0..4 {
                    e.finish(&mut m, d);
                }
            }
            let r = check_invariants(&mut m, &e)
                .and_then(|()| dma_check(&mut m, &e, &seen, false))
                .and_then(|()| gate_check(&e, &[GUEST, STRANGER]));
            if let Err(err) = r {
                let tail = log.iter().rev().take(12).rev().cloned().collect::<Vec<_>>();
                return Err(format!(
                    "seed {seed:#x} step {step}: {err}\n{}",
                    tail.join("\n")
                ));
            }
            m.fail_unmaps = fu;
            m.fail_flushes = ff;
        }
    }
    Ok(())
}

#[test]
fn a_random_walk_keeps_the_device_off_every_freed_page() {
    let seeds: u64 = std::env::var("DEVICE_WALK_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let steps: usize = std::env::var("DEVICE_WALK_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let mut fails = Vec::new();
    let only: Option<u64> = std::env::var("DEVICE_WALK_ONLY")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
    if let Some(seed) = only {
        run(seed, Format::Vtd, steps).unwrap();
        return;
    }
    for s in 0..seeds {
        for f in [Format::Vtd, Format::Lpae] {
            if let Err(e) = run(0x9e37_79b9_7f4a_7c15 ^ (s * 0x1000_0001), f, steps) {
                fails.push(format!("{f:?}: {e}"));
            }
        }
        if !fails.is_empty() {
            break;
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n\n"));
}
