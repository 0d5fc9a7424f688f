//! Finding live mappings: the ABI has no "list" command, so the tool looks
//! BFNs up, in batches, in every context a driver domain may hold. `list`
//! shows what it found; `stats` counts it per foreign domain and context.

use std::collections::BTreeMap;

use pviommu_abi::{Bfn, ContextId};
use pviommu_guest::transport::Transport;
use pviommu_guest::Client;
use serde::Serialize;

use crate::output::{CliError, MappingJson};
use crate::progress;

/// What a scan found.
pub struct Scan {
    /// Live mappings, by BFN then context.
    pub mappings: Vec<MappingJson>,
    /// BFNs looked at.
    pub scanned: u64,
}

/// Look up `count` BFNs from `from` in every context the caller may hold
/// (`0..max_contexts`); stop early once `stop_after` mappings were found.
pub fn scan(
    c: &mut Client<Box<dyn Transport>>,
    from: u64,
    count: u64,
    stop_after: Option<u64>,
) -> Result<Scan, CliError> {
    let contexts = c.caps().max_contexts.max(1);
    let per_batch = u64::from((c.caps().max_batch_ops / contexts).max(1));
    let end = from.saturating_add(count);
    // With a target the bar counts mappings found (the scan stops there),
    // else BFNs looked at.
    let bar = match stop_after {
        Some(n) => progress::bar(n, "counting mappings"),
        None => progress::bar(count, "looking up BFNs"),
    };
    let mut mappings = Vec::new();
    let mut at = from;
    while at < end {
        if stop_after.is_some_and(|n| mappings.len() as u64 >= n) {
            break;
        }
        let chunk_end = at.saturating_add(per_batch).min(end);
        let queries: Vec<(ContextId, Bfn)> = (at..chunk_end)
            .flat_map(|b| (0..contexts).map(move |ctx| (ContextId(ctx), Bfn(b))))
            .collect();
        let found = c.lookup_many(&queries)?;
        let before = mappings.len();
        for ((ctx, bfn), l) in queries.iter().zip(found) {
            if let Some(l) = l {
                mappings.push(MappingJson::new(*bfn, *ctx, &l));
            }
        }
        bar.inc(match stop_after {
            Some(_) => (mappings.len() - before) as u64,
            None => chunk_end - at,
        });
        at = chunk_end;
    }
    bar.finish_and_clear();
    Ok(Scan {
        mappings,
        scanned: at - from,
    })
}

/// Mappings of one foreign domain in one context.
#[derive(Serialize)]
pub struct GroupJson {
    /// Foreign domain.
    pub domid: u16,
    /// Context of the caller.
    pub context: u32,
    /// Live mappings.
    pub mappings: u64,
    /// Of which the device may write.
    pub writable: u64,
}

/// Count mappings per (foreign domain, context).
pub fn group(mappings: &[MappingJson]) -> Vec<GroupJson> {
    let mut by: BTreeMap<(u16, u32), (u64, u64)> = BTreeMap::new();
    for m in mappings {
        let e = by.entry((m.domid, m.context)).or_default();
        e.0 += 1;
        if m.access.contains('w') {
            e.1 += 1;
        }
    }
    by.into_iter()
        .map(|((domid, context), (mappings, writable))| GroupJson {
            domid,
            context,
            mappings,
            writable,
        })
        .collect()
}
