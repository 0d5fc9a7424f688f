//! The client API a mediator calls: open + capability check, batched
//! `map_foreign` with resumption, unmap, lookup, reserved regions, contexts,
//! over any [`Transport`], with the [`MappingCache`] in front.

use pviommu_abi::{
    feature, version_major, Bfn, ContextId, DomId, Errno, Gfn, MapRequest, MemAttr, Permissions,
    PvIommuCaps, PvIommuOp, PvIommuRegion, Request, Sbdf, EXTENT_PAGES, INTERFACE_VERSION,
};
use tracing::{debug, info_span, warn};

use crate::cache::{CacheKey, MappingCache};
use crate::entry::IommuEntry;
use crate::transport::Transport;
use crate::Error;

/// Revocation notices asked for per call while draining one context (ABI
/// 1.4); at most `revoked_next::MAX_SKIP + 1`.
const REVOKED_ROUND: usize = 128;
const _: () = assert!(REVOKED_ROUND as u64 <= pviommu_abi::revoked_next::MAX_SKIP + 1);

/// What [`Client::lookup`] returns: never a machine frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LookupResult {
    /// Foreign domain.
    pub domid: DomId,
    /// Foreign frame.
    pub gfn: Gfn,
    /// Access.
    pub perms: Permissions,
    /// Attribute.
    pub attr: MemAttr,
}

/// A revocation the hypervisor reported: the BFN no longer reaches the page
/// (it left the foreign domain, lost write access, or the domain died).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Revocation {
    /// The revoked BFN (released by the acknowledgement).
    pub bfn: Bfn,
    /// Context that held it.
    pub context: ContextId,
    /// Foreign domain whose page it was.
    pub domid: DomId,
    /// Foreign frame.
    pub gfn: Gfn,
    /// References the cache still held on it.
    pub cached_refs: u32,
}

/// Counters of what the client sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientStats {
    /// Hypercalls issued (batch calls, resumptions included).
    pub hypercalls: u64,
    /// Ops sent.
    pub ops: u64,
    /// Map requests answered from the cache.
    pub cache_hits: u64,
    /// Revocations received and acknowledged.
    pub revocations: u64,
    /// Cached pages found stale: their BFN was handed out again for
    /// another page, its revocation drained by another client of the
    /// same driver domain.
    pub stale_keys: u64,
    /// Map answers refused: a BFN outside the advertised window (sent
    /// back to the hypervisor as an unmap).
    pub bad_answers: u64,
}

/// How far [`Client::run_ops_settled`] got through its ops.
#[derive(Debug)]
pub struct Settled {
    /// The first `ran` ops ran: their statuses and outputs are the
    /// hypervisor's, also when a later batch failed.
    pub ran: usize,
    /// On an error, the ops from `ran` up to `sent` were in the call that
    /// failed (they may have run, where the failure is the transport's
    /// own); those from `sent` on were never sent.
    pub sent: usize,
    /// How the run ended.
    pub result: Result<(), Error>,
}

/// The largest count a client takes from a hypervisor's (or a daemon's)
/// answers (batch size, contexts, reserved regions): the hypervisor's own
/// limits are far below it (`max_batch_ops` at most 65 536, 16 contexts,
/// 128 regions), and a hostile peer's `u32::MAX` must not size a buffer
/// or a loop.
pub const MAX_SANE_COUNT: u32 = 1 << 16;

/// The largest quota a client takes from a hypervisor's (or a daemon's)
/// caps: the hypervisor's own limit (`MAX_QUOTA`, 16 Mi BFNs). A drain of
/// revocations is bounded by the quota, so a peer's `u64::MAX` would leave
/// it unbounded.
pub const MAX_SANE_QUOTA: u64 = 1 << 24;

/// Capabilities a client can work with: counts within [`MAX_SANE_COUNT`],
/// the quota within [`MAX_SANE_QUOTA`].
fn check_caps(caps: &PvIommuCaps) -> Result<(), Error> {
    if caps.quota > MAX_SANE_QUOTA {
        return Err(Error::Unexpected {
            what: format!(
                "capabilities: quota {} (at most {MAX_SANE_QUOTA})",
                caps.quota
            ),
            value: i64::try_from(caps.quota).unwrap_or(i64::MAX),
        });
    }
    for (what, n) in [
        ("max_batch_ops", caps.max_batch_ops),
        ("max_contexts", caps.max_contexts),
        ("nr_reserved_regions", caps.nr_reserved_regions),
    ] {
        if n > MAX_SANE_COUNT {
            return Err(Error::Unexpected {
                what: format!("capabilities: {what} {n} (at most {MAX_SANE_COUNT})"),
                value: i64::from(n),
            });
        }
    }
    Ok(())
}

/// A PV-IOMMU client.
pub struct Client<T: Transport> {
    transport: T,
    caps: PvIommuCaps,
    cache: MappingCache,
    stats: ClientStats,
    pushed_revocations: u64,
}

impl<T: Transport> Client<T> {
    /// Open: query capabilities and check the interface version.
    pub fn open(mut transport: T) -> Result<Client<T>, Error> {
        let caps = transport.query_caps()?;
        if version_major(caps.version) != version_major(INTERFACE_VERSION) {
            return Err(Error::Version {
                found: caps.version,
                expected: INTERFACE_VERSION,
            });
        }
        check_caps(&caps)?;
        Ok(Client {
            transport,
            caps,
            cache: MappingCache::default(),
            stats: ClientStats::default(),
            pushed_revocations: 0,
        })
    }

    /// Capabilities read at open.
    pub fn caps(&self) -> &PvIommuCaps {
        &self.caps
    }
    /// Capabilities read now (quota usage changes).
    pub fn refresh_caps(&mut self) -> Result<PvIommuCaps, Error> {
        let caps = self.transport.query_caps();
        self.absorb_pushed_revocations();
        let caps = caps?;
        check_caps(&caps)?;
        self.caps = caps;
        Ok(self.caps)
    }
    /// The transport.
    pub fn transport(&mut self) -> &mut T {
        &mut self.transport
    }
    /// The cache.
    pub fn cache(&self) -> &MappingCache {
        &self.cache
    }
    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Run `ops` to completion: split into batches of `max_batch_ops`, each
    /// re-issued from `nr_done` while the hypervisor reports it incomplete.
    pub fn run_ops(&mut self, ops: &mut [PvIommuOp]) -> Result<(), Error> {
        self.run_ops_settled(ops).result
    }

    /// [`run_ops`](Self::run_ops), and how far it got ([`Settled`]). A
    /// transport's `nr_done` that goes back, passes the batch, or stops
    /// short of it in a call that succeeded is [`Error::Unexpected`]: a
    /// status past it was never written.
    pub fn run_ops_settled(&mut self, ops: &mut [PvIommuOp]) -> Settled {
        let max = self
            .caps
            .max_batch_ops
            .min(self.transport.max_batch_ops())
            .max(1) as usize;
        let mut settled = 0;
        for chunk in ops.chunks_mut(max) {
            let span = info_span!(
                "pviommu_batch",
                transport = self.transport.name(),
                ops = chunk.len()
            );
            let _g = span.enter();
            let len = chunk.len();
            let (done, result) = self.run_batch(chunk);
            if result.is_err() {
                return Settled {
                    ran: settled + done,
                    sent: settled + len,
                    result,
                };
            }
            settled += done;
        }
        Settled {
            ran: settled,
            sent: settled,
            result: Ok(()),
        }
    }

    /// One batch of [`run_ops_settled`](Self::run_ops_settled): how many
    /// of `chunk` ran, and how the batch ended.
    fn run_batch(&mut self, chunk: &mut [PvIommuOp]) -> (usize, Result<(), Error>) {
        let mut done = 0usize;
        // Entries that moved no op: the hypervisor's end of the call
        // letting go of unmapped pages (and emptied tables) a bounded
        // number at a time, with every op done, or a `context_destroy`
        // waiting for its tables to go, with `nr_done` at it (design/abi.md,
        // "Batches"). Each frees some; a hypervisor that never ends is
        // refused after this many.
        const MAX_ENDING_ENTRIES: u32 = 1 << 16;
        let mut ending = 0u32;
        loop {
            let call = self.transport.batch(chunk, done as u32);
            self.absorb_pushed_revocations();
            let (ret, d) = match call {
                Ok(r) => r,
                Err(e) => return (done, Err(e)),
            };
            let d = d as usize;
            let short_success = ret == 0 && d != chunk.len();
            if d < done || d > chunk.len() || short_success {
                return (
                    done,
                    Err(Error::Unexpected {
                        what: format!(
                            "batch of {} ops answered {ret} with nr_done {d} after {done}",
                            chunk.len()
                        ),
                        value: ret,
                    }),
                );
            }
            self.stats.hypercalls += 1;
            self.stats.ops += (d - done) as u64;
            debug!(ret, nr_done = d, "batch call returned");
            if ret == 0 {
                return (d, Ok(()));
            }
            if ret != pviommu_abi::BATCH_INCOMPLETE {
                return (d, Err(Error::from_return("batch", ret)));
            }
            // Only a destroy may keep `nr_done` where it was.
            let waits_at_destroy = chunk.get(d).is_some_and(|op| {
                matches!(
                    pviommu_abi::Request::parse(op),
                    Ok(pviommu_abi::Request::ContextDestroy { .. })
                )
            });
            if d == chunk.len() || (d == done && waits_at_destroy) {
                ending += 1;
            }
            if d == done && ((d < chunk.len() && !waits_at_destroy) || ending > MAX_ENDING_ENTRIES)
            {
                return (
                    done,
                    Err(Error::Unexpected {
                        what: "batch made no progress".into(),
                        value: ret,
                    }),
                );
            }
            done = d;
        }
    }

    /// Drop BFNs the transport was told are revoked (the daemon pushes
    /// notices) from the cache, so no later map hands one out. They are
    /// still reported and acknowledged by `drain_revocations`.
    fn absorb_pushed_revocations(&mut self) {
        for (context, bfn) in self.transport.take_revocations() {
            // Not forgotten: a holder's unmap of it would acknowledge the
            // notice while others still use the BFN (and the drain would
            // never hand it to the caller). See `MappingCache::revoked`.
            if self.cache.mark_revoked(context, bfn).is_some() {
                debug!(bfn = bfn.0, context = context.0, "pushed revocation");
            }
            self.pushed_revocations += 1;
        }
    }

    /// Wait up to `timeout` until revocations are pending: `Ok(true)` when
    /// some are (drain them with `drain_revocations`), `Ok(false)` on
    /// timeout. Checks the caps first; then, on the daemon, waits for its
    /// push (and drops the pushed BFNs from the cache as they arrive). A
    /// transport without push (in-process, Xen) does not wait: on Xen, wait
    /// on [`crate::notify::RevocationEvents`] and call this afterwards.
    pub fn wait_revocations(&mut self, timeout: std::time::Duration) -> Result<bool, Error> {
        self.absorb_pushed_revocations();
        if self.refresh_caps()?.revoked > 0 {
            return Ok(true);
        }
        let pushed = self.transport.wait_revocations(timeout);
        self.absorb_pushed_revocations();
        pushed
    }

    /// Revocation notices pushed to this client so far (daemon only).
    pub fn pushed_revocations(&self) -> u64 {
        self.pushed_revocations
    }

    /// Map `gfns` of `domid` into `context`; one result per gfn, in order.
    /// Cached pages cost no hypercall; the rest go in as few batches as the
    /// advertised maximum allows.
    pub fn map_foreign(
        &mut self,
        domid: DomId,
        gfns: &[Gfn],
        perms: Permissions,
        attr: MemAttr,
        context: ContextId,
    ) -> Vec<Result<Bfn, Error>> {
        let mut results: Vec<Option<Result<Bfn, Error>>> = Vec::with_capacity(gfns.len());
        let mut ops = Vec::new();
        let mut pending = Vec::new();
        // The new pages asked for so far: a repeat is found in O(1) (a
        // scan of `pending` made a call of n new gfns cost n^2 / 2
        // compares, with the client's lock held).
        let mut asked = std::collections::HashSet::new();
        for (i, gfn) in gfns.iter().enumerate() {
            let key = CacheKey {
                domid,
                gfn: *gfn,
                context,
                perms,
                attr,
            };
            if let Some(bfn) = self.cache.get_ref(&key) {
                self.stats.cache_hits += 1;
                results.push(Some(Ok(bfn)));
                continue;
            }
            // The same new page twice in one call: map once, reference twice.
            if !asked.insert(key) {
                results.push(None);
                pending.push((i, key));
                continue;
            }
            results.push(None);
            pending.push((i, key));
            ops.push(
                Request::Map(MapRequest {
                    context,
                    domid,
                    gfn: *gfn,
                    perms,
                    attr,
                    grant: false,
                })
                .encode(),
            );
        }
        // Ops that ran are settled by their status (a later batch's failure
        // does not undo them: their BFNs are live and cached); the rest
        // fail with the call's error.
        let Settled {
            ran: settled,
            result: call,
            ..
        } = self.run_ops_settled(&mut ops);
        let stopped = call.err().map(|e| e.to_string());
        #[derive(Clone, Copy)]
        enum FirstOp {
            Ran(Result<Bfn, Errno>),
            /// Answered with a BFN outside the window: refused, and sent
            /// back.
            OutOfWindow(u64),
            DidNotRun,
        }
        let mut give_back = Vec::new();
        let mut next_op = 0usize;
        let mut first_result: std::collections::HashMap<CacheKey, FirstOp> = Default::default();
        for (i, key) in pending {
            if results[i].is_some() {
                continue;
            }
            let r = match first_result.get(&key) {
                Some(FirstOp::Ran(Ok(b))) => {
                    let b = *b;
                    self.cache.get_ref(&key);
                    FirstOp::Ran(Ok(b))
                }
                Some(first) => *first,
                None => {
                    let k = next_op;
                    next_op += 1;
                    let r = match ops.get(k) {
                        Some(op) if k < settled && op.status == 0 && !self.in_window(op.bfn, 1) => {
                            self.stats.bad_answers += 1;
                            give_back.push(
                                Request::Unmap {
                                    context,
                                    bfn: Bfn(op.bfn),
                                }
                                .encode(),
                            );
                            FirstOp::OutOfWindow(op.bfn)
                        }
                        Some(op) if k < settled && op.status == 0 => {
                            self.cache_fresh(key, Bfn(op.bfn));
                            FirstOp::Ran(Ok(Bfn(op.bfn)))
                        }
                        Some(op) if k < settled => {
                            FirstOp::Ran(Err(Errno::from_code(op.status).unwrap_or(Errno::Inval)))
                        }
                        _ => FirstOp::DidNotRun,
                    };
                    first_result.insert(key, r);
                    r
                }
            };
            let what = || format!("map d{} gfn {:#x}", key.domid.0, key.gfn.0);
            results[i] = Some(match r {
                FirstOp::Ran(Ok(b)) => Ok(b),
                FirstOp::Ran(Err(errno)) => Err(Error::Hypervisor {
                    what: what(),
                    errno,
                }),
                FirstOp::OutOfWindow(bfn) => Err(Error::Unexpected {
                    what: format!("{}: BFN outside the window", what()),
                    value: bfn as i64,
                }),
                FirstOp::DidNotRun => Err(Error::Remote(format!(
                    "{}: {}",
                    what(),
                    stopped.as_deref().unwrap_or("not run")
                ))),
            });
        }
        self.give_back(give_back);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::InvalidArgument("lost result".into()))))
            .collect()
    }

    /// Whether the `pages` BFNs from `bfn` lie in the window the caps
    /// advertise: a BFN the hypervisor answers outside it is no mapping
    /// a device may be given (a broken or hostile peer's answer).
    fn in_window(&self, bfn: u64, pages: u64) -> bool {
        bfn >= self.caps.bfn_window_start
            && bfn
                .checked_add(pages)
                .is_some_and(|end| end <= self.caps.bfn_window_end)
    }

    /// File a mapping the hypervisor just made; a key filed under its BFN
    /// before is stale ([`MappingCache::insert`]): counted and logged.
    fn cache_fresh(&mut self, key: CacheKey, bfn: Bfn) {
        if let Some(old) = self.cache.insert(key, bfn) {
            self.stats.stale_keys += 1;
            tracing::warn!(
                bfn = bfn.0,
                domid = old.domid.0,
                gfn = old.gfn.0,
                "cached page stale: its BFN was handed out again (its revocation drained elsewhere)"
            );
        }
    }

    /// Send back what the hypervisor answered but the client refused (a
    /// map's BFN outside the window, an extent's misaligned first BFN):
    /// the references it says it took go back. Best effort: should that
    /// fail too, they stay until the driver domain's teardown.
    fn give_back(&mut self, mut ops: Vec<PvIommuOp>) {
        if ops.is_empty() {
            return;
        }
        if let Err(e) = self.run_ops(&mut ops) {
            tracing::warn!(error = %e, "giving back refused map answers");
        }
    }

    /// Map the 2 MiB extent of `domid` from `gfn` (a multiple of 512) into
    /// `context` at 512 consecutive BFNs, the first (answered) a multiple of
    /// 512 (ABI 1.6, `PVIOMMU_F_EXTENT_2M`): what a mediator needs to shadow
    /// a guest's 2 MiB GPU page with one 2 MiB entry. All or nothing; the
    /// frames must be one machine run (`EXDEV` otherwise: shadow the page
    /// as 4 KiB entries then, as GVT-g splits a 2 MiB entry it cannot map).
    ///
    /// Each page is cached as a mapping of its own, with one reference: a
    /// later [`map_foreign`](Self::map_foreign) of one of them costs no
    /// hypercall, and [`unmap_extent`](Self::unmap_extent) (or 512
    /// [`unmap`](Self::unmap)s) releases them. An extent cached whole at
    /// one aligned run takes a reference on each page, no hypercall; one
    /// cached in part is refused `EBUSY` with nothing sent (map its pages
    /// one by one: they come from the cache).
    pub fn map_extent(
        &mut self,
        domid: DomId,
        gfn: Gfn,
        perms: Permissions,
        attr: MemAttr,
        context: ContextId,
    ) -> Result<Bfn, Error> {
        self.map_extents(domid, &[gfn], perms, attr, context)
            .pop()
            .unwrap_or_else(|| Err(Error::InvalidArgument("lost result".into())))
    }

    /// [`map_extent`](Self::map_extent) of each of `gfns`, in as few
    /// batches as the advertised maximum allows; one result per extent, in
    /// order. Ops that ran are settled by their status, also when a later
    /// batch failed.
    pub fn map_extents(
        &mut self,
        domid: DomId,
        gfns: &[Gfn],
        perms: Permissions,
        attr: MemAttr,
        context: ContextId,
    ) -> Vec<Result<Bfn, Error>> {
        if self.caps.features & feature::EXTENTS_2M == 0 {
            let no = || {
                Error::InvalidArgument("the hypervisor offers no 2 MiB extents (ABI 1.6)".into())
            };
            return gfns.iter().map(|_| Err(no())).collect();
        }
        let key = |gfn: Gfn, i: u64| CacheKey {
            domid,
            gfn: Gfn(gfn.0 + i),
            context,
            perms,
            attr,
        };
        let mut results: Vec<Option<Result<Bfn, Error>>> = Vec::with_capacity(gfns.len());
        let mut ops = Vec::new();
        let mut sent: Vec<(usize, Gfn)> = Vec::new();
        // Each extent sent, by its gfn: the op's index in `gfns` (a repeat
        // is found in O(1), as `map_foreign`'s).
        let mut first_of: std::collections::HashMap<Gfn, usize> = Default::default();
        let mut dups: Vec<(usize, Gfn)> = Vec::new();
        for (i, &gfn) in gfns.iter().enumerate() {
            if !pviommu_abi::extent_aligned(gfn.0) || gfn.0 > u64::MAX - EXTENT_PAGES {
                results.push(Some(Err(Error::InvalidArgument(format!(
                    "extent gfn {:#x}: not a multiple of 512",
                    gfn.0
                )))));
                continue;
            }
            // Cached whole, in place: one reference more on each page.
            let first = self.cache.bfn_of(&key(gfn, 0));
            let in_place = first.is_some_and(|b| {
                pviommu_abi::extent_aligned(b.0)
                    && (1..EXTENT_PAGES)
                        .all(|p| self.cache.bfn_of(&key(gfn, p)) == Some(Bfn(b.0 + p)))
            });
            if let (true, Some(bfn)) = (in_place, first) {
                for p in 0..EXTENT_PAGES {
                    self.cache.get_ref(&key(gfn, p));
                }
                self.stats.cache_hits += EXTENT_PAGES;
                results.push(Some(Ok(bfn)));
                continue;
            }
            // Cached in part: the hypervisor would answer EBUSY for a live
            // page, or revoke a stale one and map it anew, and the cache
            // would then have to drop a BFN its other holders (shadow
            // leaves) still use: their unmap would acknowledge the notice
            // before they heard of it. Refused here, with nothing sent;
            // the caller maps the pages one by one, from the cache.
            if (0..EXTENT_PAGES).any(|p| self.cache.bfn_of(&key(gfn, p)).is_some()) {
                results.push(Some(Err(Error::Hypervisor {
                    what: format!(
                        "map extent d{} gfn {:#x}: pages of it are mapped already, not as it",
                        domid.0, gfn.0
                    ),
                    errno: Errno::Busy,
                })));
                continue;
            }
            // The same extent twice in one call: sent once, the later ones
            // take references on what it got. (Sent twice, the hypervisor
            // shared the first with the second, and giving the share's
            // extra references back took 512 page unmaps in a call of
            // their own, any of which acknowledged a revocation that came
            // in between, with both holders still using the BFN.)
            if first_of.contains_key(&gfn) {
                results.push(None);
                dups.push((i, gfn));
                continue;
            }
            results.push(None);
            first_of.insert(gfn, i);
            sent.push((i, gfn));
            ops.push(
                Request::MapExtent(MapRequest {
                    context,
                    domid,
                    gfn,
                    perms,
                    attr,
                    grant: false,
                })
                .encode(),
            );
        }
        let Settled {
            ran, result: call, ..
        } = self.run_ops_settled(&mut ops);
        let stopped = call.err().map(|e| e.to_string());
        // Unmaps of the references a share added to pages the cache holds.
        let mut extra = Vec::new();
        let mut give_back = Vec::new();
        for (k, ((i, gfn), op)) in sent.into_iter().zip(&ops).enumerate() {
            let what = || format!("map extent d{} gfn {:#x}", domid.0, gfn.0);
            results[i] = Some(if k >= ran {
                Err(Error::Remote(format!(
                    "{}: {}",
                    what(),
                    stopped.as_deref().unwrap_or("not run")
                )))
            } else if op.status != 0 {
                Err(Error::Hypervisor {
                    what: what(),
                    errno: Errno::from_code(op.status).unwrap_or(Errno::Inval),
                })
            } else if !pviommu_abi::extent_aligned(op.bfn) || !self.in_window(op.bfn, EXTENT_PAGES)
            {
                // No extent a device may be given: its pages go back one
                // by one (an extent unmap refuses a misaligned BFN).
                self.stats.bad_answers += 1;
                let first = op.bfn;
                give_back.extend((0..EXTENT_PAGES).map(|p| {
                    Request::Unmap {
                        context,
                        bfn: Bfn(first.wrapping_add(p)),
                    }
                    .encode()
                }));
                Err(Error::Unexpected {
                    what: "map extent: first BFN not a multiple of 512 in the window".into(),
                    value: op.bfn as i64,
                })
            } else {
                let bfn = Bfn(op.bfn);
                let at = |p: u64| Bfn(bfn.0 + p);
                // Pages the cache holds are in place: cached since the
                // check above only by an earlier op of this call for the
                // same extent (which the hypervisor then shared). One
                // cached elsewhere cannot be, the check having refused
                // it; were it so, the extent goes back whole (one
                // reference less on each page) and is refused.
                let elsewhere = (0..EXTENT_PAGES)
                    .any(|p| self.cache.bfn_of(&key(gfn, p)).is_some_and(|b| b != at(p)));
                if elsewhere {
                    extra.push(Request::UnmapExtent { context, bfn }.encode());
                    Err(Error::Unexpected {
                        what: "map extent: pages of it cached at other BFNs".into(),
                        value: op.bfn as i64,
                    })
                } else {
                    // Shared by the hypervisor (each page one hypervisor
                    // reference more): a page the cache holds already
                    // keeps the one it has, and the extra one goes back.
                    for p in 0..EXTENT_PAGES {
                        if self.cache.get_ref(&key(gfn, p)).is_some() {
                            extra.push(
                                Request::Unmap {
                                    context,
                                    bfn: at(p),
                                }
                                .encode(),
                            );
                        } else {
                            self.cache_fresh(key(gfn, p), at(p));
                        }
                    }
                    Ok(bfn)
                }
            });
        }
        for (i, gfn) in dups {
            let first = first_of.get(&gfn).copied();
            let answer = first.and_then(|j| results.get(j)).and_then(|r| match r {
                Some(Ok(b)) => Some(Ok(*b)),
                Some(Err(e)) => Some(Err(e.to_string())),
                None => None,
            });
            results[i] = Some(match answer {
                Some(Ok(b)) => {
                    for p in 0..EXTENT_PAGES {
                        self.cache.get_ref(&key(gfn, p));
                    }
                    Ok(b)
                }
                Some(Err(e)) => Err(Error::Remote(format!(
                    "map extent d{} gfn {:#x}: {e}",
                    domid.0, gfn.0
                ))),
                None => Err(Error::InvalidArgument("lost result".into())),
            });
        }
        self.give_back(give_back);
        if !extra.is_empty() {
            // (Each drops the reference a share added; the page stays
            // mapped by the one the cache already held.) Should that fail,
            // the hypervisor keeps a reference more on those pages than
            // the cache counts: released with the domain, or the driver's.
            if let Err(e) = self.run_ops(&mut extra) {
                tracing::warn!(error = %e, "returning the extra references of a shared extent");
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::InvalidArgument("lost result".into()))))
            .collect()
    }

    /// Release one reference on each page of the extent from `bfn` (a
    /// multiple of 512) in `context`, as [`unmap`](Self::unmap) of its 512
    /// BFNs does, in one op when the cache held the last reference of every
    /// page (or none of them; ABI 1.6), else one op per page it must drop.
    pub fn unmap_extent(&mut self, bfn: Bfn, context: ContextId) -> Result<(), Error> {
        self.unmap_extents(&[bfn], context)
            .pop()
            .unwrap_or_else(|| Err(Error::InvalidArgument("lost result".into())))
    }

    /// [`unmap_extent`](Self::unmap_extent) of each of `firsts`, the
    /// extent ops in as few batches as the advertised maximum allows; one
    /// result per extent, in order.
    pub fn unmap_extents(&mut self, firsts: &[Bfn], context: ContextId) -> Vec<Result<(), Error>> {
        let extents = self.caps.features & feature::EXTENTS_2M != 0;
        let mut results: Vec<Option<Result<(), Error>>> = Vec::with_capacity(firsts.len());
        let mut ops = Vec::new();
        let mut sent = Vec::new();
        for (i, &bfn) in firsts.iter().enumerate() {
            if !pviommu_abi::extent_aligned(bfn.0) || bfn.0 > u64::MAX - EXTENT_PAGES {
                results.push(Some(Err(Error::InvalidArgument(format!(
                    "extent bfn {:#x}: not a multiple of 512",
                    bfn.0
                )))));
                continue;
            }
            let whole =
                extents && (0..EXTENT_PAGES).all(|p| self.cache.refs(context, Bfn(bfn.0 + p)) <= 1);
            if !whole {
                let bfns: Vec<Bfn> = (0..EXTENT_PAGES).map(|p| Bfn(bfn.0 + p)).collect();
                results.push(Some(self.unmap(&bfns, context).into_iter().collect()));
                continue;
            }
            let keys: Vec<Option<CacheKey>> = (0..EXTENT_PAGES)
                .map(|p| self.cache.forget(context, Bfn(bfn.0 + p)))
                .collect();
            results.push(None);
            sent.push((i, bfn, keys));
            ops.push(Request::UnmapExtent { context, bfn }.encode());
        }
        let Settled {
            ran,
            sent: tried,
            result: call,
        } = self.run_ops_settled(&mut ops);
        for (k, ((i, bfn, keys), op)) in sent.into_iter().zip(&ops).enumerate() {
            let failed = match &call {
                Err(e) if k >= ran => {
                    // Never sent: still mapped, cached again (state as
                    // before the call). One that may have run is left out
                    // of the cache: its BFNs may be gone (a later unmap of
                    // one is answered ENOENT, never another's page:
                    // revoked BFNs stay reserved until acknowledged).
                    if k >= tried {
                        self.recache_extent(bfn, keys);
                    }
                    results[i] = Some(Err(Error::Remote(format!(
                        "unmap extent bfn {:#x}: {e}",
                        bfn.0
                    ))));
                    continue;
                }
                _ if op.status == 0 => None,
                _ if op.status == Errno::Stale.negated() => {
                    self.stats.revocations += 1;
                    None
                }
                // Refused whole (nothing was done).
                _ => Some(Error::Hypervisor {
                    what: format!("unmap extent bfn {:#x}", bfn.0),
                    errno: Errno::from_code(op.status).unwrap_or(Errno::Inval),
                }),
            };
            results[i] = Some(match failed {
                None => Ok(()),
                Some(e) => {
                    self.recache_extent(bfn, keys);
                    Err(e)
                }
            });
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::InvalidArgument("lost result".into()))))
            .collect()
    }

    /// Cache again the pages of the extent from `first` an unmap forgot.
    fn recache_extent(&mut self, first: Bfn, keys: Vec<Option<CacheKey>>) {
        for (p, k) in (0u64..).zip(keys) {
            if let Some(k) = k {
                self.cache.insert(k, Bfn(first.0 + p));
            }
        }
    }

    /// Release one reference per BFN; the last reference unmaps it. BFNs the
    /// cache does not know are sent to the hypervisor as they are.
    pub fn unmap(&mut self, bfns: &[Bfn], context: ContextId) -> Vec<Result<(), Error>> {
        let mut results: Vec<Option<Result<(), Error>>> = Vec::with_capacity(bfns.len());
        let mut ops = Vec::new();
        let mut sent = Vec::new();
        for (i, bfn) in bfns.iter().enumerate() {
            let key = self.cache.key_of(context, *bfn);
            match self.cache.release(context, *bfn) {
                Some(false) => results.push(Some(Ok(()))),
                // The last cached reference, or a BFN the cache never saw.
                Some(true) | None => {
                    results.push(None);
                    sent.push((i, *bfn, key));
                    ops.push(Request::Unmap { context, bfn: *bfn }.encode());
                }
            }
        }
        // Unmaps that ran are settled by their status, also when a later
        // batch failed (reported failed, the caller would unmap them again:
        // a BFN handed out anew meanwhile would go); the rest fail with the
        // call's error.
        let Settled {
            ran: settled,
            sent: tried,
            result: call,
        } = self.run_ops_settled(&mut ops);
        for (k, ((i, bfn, key), op)) in sent.into_iter().zip(&ops).enumerate() {
            results[i] = Some(match &call {
                Err(e) if k >= settled => {
                    // Never sent: the mapping is still there, and cached
                    // again (state as before the call). One that may have
                    // run is left out of the cache: its BFN may be gone.
                    if let Some(key) = key.filter(|_| k >= tried) {
                        self.cache.insert(key, bfn);
                    }
                    Err(Error::Remote(format!("unmap bfn {:#x}: {e}", bfn.0)))
                }
                _ if op.status == 0 => Ok(()),
                // Revoked meanwhile: this unmap acknowledged it and the BFN
                // is released, which is what the caller wanted.
                _ if op.status == Errno::Stale.negated() => {
                    self.stats.revocations += 1;
                    Ok(())
                }
                _ => Err(Error::Hypervisor {
                    what: format!("unmap bfn {:#x}", bfn.0),
                    errno: Errno::from_code(op.status).unwrap_or(Errno::Inval),
                }),
            });
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }

    /// Receive every pending revocation: drop the revoked BFNs from the
    /// cache (whatever their references) and acknowledge them, so the
    /// hypervisor may hand them out again. A mediator calls this when
    /// `caps().revoked` (refreshed) is non-zero, or periodically, and turns
    /// the shadow entries that held these BFNs non-present.
    pub fn drain_revocations(&mut self) -> Result<Vec<Revocation>, Error> {
        self.drain_revocations_up_to(self.drain_bound())
    }

    /// How many notices a drain of everything pending takes at most: the
    /// quota bounds the notices queued at any one time; any queued after
    /// this many wait for the next drain.
    pub fn drain_bound(&self) -> usize {
        usize::try_from(self.caps.quota.saturating_add(1)).unwrap_or(usize::MAX)
    }

    /// Like [`drain_revocations`](Self::drain_revocations), but at most
    /// `max` of them (the rest stay queued for the next call).
    pub fn drain_revocations_up_to(&mut self, max: usize) -> Result<Vec<Revocation>, Error> {
        self.drain_revocations_with(max, |_| {})
    }

    /// Like [`drain_revocations_up_to`](Self::drain_revocations_up_to), but
    /// hands each notice to `on_notice` before acknowledging it: until the
    /// acknowledgement the hypervisor keeps the BFN reserved, so a mediator
    /// drops every use of it here (its shadow leaves) and no other mapping
    /// can receive it meanwhile.
    pub fn drain_revocations_with(
        &mut self,
        max: usize,
        on_notice: impl FnMut(&Revocation),
    ) -> Result<Vec<Revocation>, Error> {
        self.drain_scoped(None, max, on_notice)
    }

    /// Like [`drain_revocations_with`](Self::drain_revocations_with), but
    /// only the notices of `context`: the others stay queued for whoever
    /// owns them. Two mediators in one driver domain, each with contexts of
    /// its own (one per GPU, say), each drain theirs this way; draining
    /// everything would take the other's notices, and it would never learn
    /// that its BFNs were revoked. Needs ABI 1.4's
    /// [`REVOKED_IN_CONTEXT`](feature::REVOKED_IN_CONTEXT): without it the
    /// hypervisor only reports the oldest notice of any context, and this
    /// answers `EOPNOTSUPP` having asked for nothing.
    pub fn drain_revocations_in(
        &mut self,
        context: ContextId,
        max: usize,
        on_notice: impl FnMut(&Revocation),
    ) -> Result<Vec<Revocation>, Error> {
        if self.caps.features & feature::REVOKED_IN_CONTEXT == 0 {
            return Err(Error::Hypervisor {
                what: format!(
                    "revocation notices of context {} alone (the hypervisor lacks revoked-in-context, ABI 1.4)",
                    context.0
                ),
                errno: Errno::OpNotSupp,
            });
        }
        self.drain_scoped(Some(context), max, on_notice)
    }

    /// The drain: every context's notices (`only` = `None`), or one
    /// context's.
    fn drain_scoped(
        &mut self,
        only: Option<ContextId>,
        max: usize,
        mut on_notice: impl FnMut(&Revocation),
    ) -> Result<Vec<Revocation>, Error> {
        // With ABI 1.4 a round asks for up to `REVOKED_ROUND` notices of one
        // context in one call (`revoked_next` of that context, skip 0, 1,
        // ...); before, one. Each round starts with the acknowledgements of
        // the previous round's notices, so it asks from skip 0 again.
        let in_context = self.caps.features & feature::REVOKED_IN_CONTEXT != 0;
        // With ABI 1.5 each notice comes with its number and is
        // acknowledged by it: an acknowledgement of a notice another
        // thread acknowledged first cannot release a later revocation of
        // the same BFN, which nobody has been told of.
        let numbered = self.caps.features & feature::REVOKED_NUMBERED != 0;
        let mut out = Vec::new();
        let mut acks: Vec<PvIommuOp> = Vec::new();
        // The context being drained in rounds; `None`: ask for the oldest
        // notice of any context, which names the next one.
        let mut draining: Option<ContextId> = only;
        // Short rounds of `only` so far (see below), and whether what is
        // left is to send the last acks.
        let mut short_rounds = 0;
        let mut finished = false;
        // An error once notices were delivered (handed to `on_notice`,
        // dropped from the cache) returns those instead: the caller must
        // not lose them. Those not acknowledged yet are reported again by
        // the next drain, which meets the error again if it lasts.
        let stop = |out: Vec<Revocation>, e: Error| {
            if out.is_empty() {
                Err(e)
            } else {
                warn!(error = %e, delivered = out.len(), "revocation drain stopped early");
                Ok(out)
            }
        };
        loop {
            let want = if finished {
                0
            } else {
                REVOKED_ROUND.min(max - out.len())
            };
            let mut ops = std::mem::take(&mut acks);
            let acked = ops.len();
            match draining {
                _ if want == 0 => {}
                Some(context) => ops.extend((0..want as u32).map(|skip| {
                    Request::RevokedNextIn {
                        context,
                        skip,
                        numbered,
                    }
                    .encode()
                })),
                None => ops.push(Request::RevokedNext { numbered }.encode()),
            }
            if ops.is_empty() {
                return Ok(out);
            }
            if let Err(e) = self.run_ops(&mut ops) {
                return stop(out, e);
            }
            // ENOENT: acknowledged elsewhere meanwhile (numbered: exactly
            // that notice; before ABI 1.5, see design/abi.md); the notice
            // was delivered here. EBUSY (unnumbered only): acknowledged
            // elsewhere, and its BFN, handed out again, is being revoked
            // again: that is a notice of its own, reported when it is one.
            let refused = ops[..acked].iter().find(|a| {
                a.status != 0
                    && a.status != Errno::NoEnt.negated()
                    && a.status != Errno::Busy.negated()
            });
            if let Some(a) = refused {
                return stop(out, Error::from_return("revoked_ack", a.status as i64));
            }
            let asked = &ops[acked..];
            let mut reported = 0;
            for next in asked {
                if next.status == Errno::NoEnt.negated() {
                    break;
                }
                if next.status != 0 {
                    return stop(out, Error::from_return("revoked_next", next.status as i64));
                }
                let (context, bfn) = (ContextId(next.context), Bfn(next.bfn));
                // A BFN reported twice in one round was acknowledged by
                // another thread of this domain meanwhile, handed out again
                // and revoked again: a notice of its own, delivered. By
                // number each is acknowledged (the first answers ENOENT);
                // without numbers one acknowledgement takes the one queued.
                // (Numbers start at 1: one of 0 is no number, and an ack
                // naming it would never take the notice.)
                let ack = Request::RevokedAck {
                    context,
                    bfn,
                    notice: (numbered && next.notice != 0).then_some(next.notice),
                }
                .encode();
                let acked = acks
                    .iter()
                    .any(|a| (a.context, a.bfn, a.notice) == (ack.context, ack.bfn, ack.notice));
                let cached_refs = u32::try_from(self.cache.refs(context, bfn)).unwrap_or(u32::MAX);
                self.cache.forget(context, bfn);
                self.stats.revocations += 1;
                let revocation = Revocation {
                    bfn,
                    context,
                    domid: DomId(next.domid),
                    gfn: Gfn(next.gfn),
                    cached_refs,
                };
                on_notice(&revocation);
                out.push(revocation);
                if !acked {
                    acks.push(ack);
                }
                reported += 1;
            }
            draining = match (draining, asked.first()) {
                // This context has more than a round held: go on with it.
                (Some(c), _) if reported == asked.len() => Some(c),
                // The oldest notice's context: drain it next round.
                (None, Some(first)) if reported == 1 && in_context => {
                    Some(ContextId(first.context))
                }
                // The one context asked for, short: the first short round
                // asks once more with its acks (another thread's acks may
                // have moved a notice past this round's skips); a second
                // one ends it (a notice queued meanwhile waits for the next
                // drain, so a busy producer cannot keep it going).
                (Some(c), _) if only.is_some() => {
                    short_rounds += 1;
                    finished = reported == 0 || short_rounds > 1;
                    Some(c)
                }
                // This context ran out: find the next one.
                (Some(_), _) => None,
                (None, _) => {
                    if reported == 0 && acks.is_empty() {
                        return Ok(out);
                    }
                    None
                }
            };
        }
    }

    /// Describe a BFN.
    pub fn lookup(&mut self, bfn: Bfn, context: ContextId) -> Result<LookupResult, Error> {
        let mut ops = [Request::Lookup { context, bfn }.encode()];
        self.run_ops(&mut ops)?;
        let op = ops[0];
        if op.status != 0 {
            return Err(Error::from_return(
                format!("lookup bfn {:#x}", bfn.0),
                op.status as i64,
            ));
        }
        Ok(decode_lookup(&op))
    }

    /// Describe many (context, BFN) pairs in as few batches as the
    /// advertised maximum allows: `None` where nothing live is mapped
    /// (`ENOENT`); any other refusal fails the whole call.
    pub fn lookup_many(
        &mut self,
        queries: &[(ContextId, Bfn)],
    ) -> Result<Vec<Option<LookupResult>>, Error> {
        let mut ops: Vec<PvIommuOp> = queries
            .iter()
            .map(|&(context, bfn)| Request::Lookup { context, bfn }.encode())
            .collect();
        self.run_ops(&mut ops)?;
        ops.iter()
            .zip(queries)
            .map(|(op, (_, bfn))| match op.status {
                0 => Ok(Some(decode_lookup(op))),
                s if s == Errno::NoEnt.negated() => Ok(None),
                s => Err(Error::from_return(
                    format!("lookup bfn {:#x}", bfn.0),
                    s as i64,
                )),
            })
            .collect()
    }

    /// Every reserved region.
    pub fn reserved_regions(&mut self) -> Result<Vec<PvIommuRegion>, Error> {
        let mut out = Vec::new();
        loop {
            let (regions, total) = self.transport.reserved_regions(out.len() as u32, 64)?;
            self.stats.hypercalls += 1;
            let got = regions.len();
            // A count past any host's, or more regions than asked for or
            // than the total, is a peer's lie: no loop or buffer follows it.
            if total > MAX_SANE_COUNT || got > 64 || out.len() + got > total as usize {
                return Err(Error::Unexpected {
                    what: format!(
                        "reserved regions: {got} more after {} of a total of {total}",
                        out.len()
                    ),
                    value: i64::from(total),
                });
            }
            out.extend(regions);
            if out.len() as u32 >= total || got == 0 {
                return Ok(out);
            }
        }
    }

    /// The hypervisor's counters for driver domain `domid` and its time
    /// breakdown (`PVIOMMU_CMD_stats`; control domain only). `flags` from
    /// [`pviommu_abi::stats_flag`]: reset after reading, timing on or off.
    pub fn hypervisor_stats(
        &mut self,
        domid: DomId,
        flags: u16,
    ) -> Result<pviommu_abi::PvIommuStats, Error> {
        self.transport.stats(domid, flags)
    }

    /// The toolstack sets `domid`'s BFN quota (0: the boot default). Only
    /// the control domain may.
    pub fn set_limits(&mut self, domid: DomId, quota: u64) -> Result<(), Error> {
        self.transport.set_limits(domid, quota)?;
        self.stats.hypercalls += 1;
        Ok(())
    }

    /// Create an IOMMU context.
    pub fn context_create(&mut self) -> Result<ContextId, Error> {
        let mut ops = [Request::ContextCreate.encode()];
        self.run_ops(&mut ops)?;
        if ops[0].status != 0 {
            return Err(Error::from_return("context_create", ops[0].status as i64));
        }
        Ok(ContextId(ops[0].context))
    }

    /// Destroy an empty IOMMU context: no BFN in it in any state and no
    /// device attached (`EBUSY` otherwise: detach first).
    pub fn context_destroy(&mut self, context: ContextId) -> Result<(), Error> {
        self.one_op(
            Request::ContextDestroy { context },
            format!("context_destroy {}", context.0),
        )
    }

    /// Point `device`, one of the caller's PCI devices, at `context` (one
    /// it created; not the default, ABI 1.3): from then on its DMA is
    /// translated by that context's tables only. Refused with `EPERM` (not
    /// the caller's device), `ENODEV` (no such device), `EBUSY` (attached
    /// already, to any context), `ENOENT` (no such context), `ENOSPC` (the
    /// context has its most devices), `EOPNOTSUPP` (the device shares its
    /// requester id, needs an RMRR or has ATS, or the IOMMU has no contexts
    /// of the engine's), `EINVAL` (context 0).
    pub fn context_attach(&mut self, context: ContextId, device: Sbdf) -> Result<(), Error> {
        self.one_op(
            Request::ContextAttach { context, device },
            format!("context_attach {device} to context {}", context.0),
        )
    }

    /// Put `device`, attached to `context`, back in the default context
    /// (its owner's own tables). `ENOENT` if it is not attached to
    /// `context`.
    pub fn context_detach(&mut self, context: ContextId, device: Sbdf) -> Result<(), Error> {
        self.one_op(
            Request::ContextDetach { context, device },
            format!("context_detach {device} from context {}", context.0),
        )
    }

    /// The leaf entry a device attached to `context` of driver domain
    /// `domid` finds for `bfn`, address bits zeroed
    /// (`PVIOMMU_CMD_entry`, ABI 1.3; control domain only): what the
    /// engine wrote for the mapping's access and memory attribute.
    /// `EPERM` for another caller, `EINVAL` for context 0 (the host's own
    /// tables), `ENOENT` for no such context or nothing mapped at `bfn`.
    pub fn entry(
        &mut self,
        domid: DomId,
        context: ContextId,
        bfn: Bfn,
    ) -> Result<IommuEntry, Error> {
        let e = self.transport.entry(domid, context, bfn)?;
        self.stats.hypercalls += 1;
        Ok(IommuEntry {
            domid,
            context,
            bfn,
            level: e.level.into(),
            format: e.format,
            bits: e.bits,
        })
    }

    /// Run one op that answers with its status only.
    fn one_op(&mut self, req: Request, what: String) -> Result<(), Error> {
        let mut ops = [req.encode()];
        self.run_ops(&mut ops)?;
        if ops[0].status != 0 {
            return Err(Error::from_return(what, ops[0].status as i64));
        }
        Ok(())
    }
}

/// The answer of a successful lookup op.
fn decode_lookup(op: &PvIommuOp) -> LookupResult {
    LookupResult {
        domid: DomId(op.domid),
        gfn: Gfn(op.gfn),
        perms: Permissions {
            read: op.flags & pviommu_abi::op_flags::READ != 0,
            write: op.flags & pviommu_abi::op_flags::WRITE != 0,
        },
        attr: MemAttr::from_field(
            (op.flags & pviommu_abi::op_flags::ATTR_MASK) >> pviommu_abi::op_flags::ATTR_SHIFT,
        )
        .unwrap_or_default(),
    }
}
