//! Parsing a raw [`PvIommuOp`] into a typed [`Request`]: every field the
//! guest controls is validated here, once, before the engine touches state.

use crate::{
    extent_aligned, op_flags, revoked_ack, revoked_next, subop, Bfn, ContextId, DomId, Errno, Gfn,
    MemAttr, Permissions, PvIommuOp, Sbdf, EXTENT_PAGES,
};

/// What a map asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MapRequest {
    /// The caller's IOMMU context to map into.
    pub context: ContextId,
    /// The foreign domain owning the frame.
    pub domid: DomId,
    /// The foreign frame.
    pub gfn: Gfn,
    /// Device access rights.
    pub perms: Permissions,
    /// Memory attribute.
    pub attr: MemAttr,
    /// `gfn` is a grant reference.
    pub grant: bool,
}

/// A validated batch op.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Request {
    /// Map a foreign frame; answer the BFN.
    Map(MapRequest),
    /// Map a 2 MiB extent of a foreign domain's frames at 512 consecutive
    /// BFNs; answer the first ([`op_flags::EXTENT_2M`], ABI 1.6). `gfn` is
    /// a multiple of [`EXTENT_PAGES`](crate::EXTENT_PAGES), never a grant.
    MapExtent(MapRequest),
    /// Drop a reference to each of the 512 BFNs from `bfn`, a multiple of
    /// [`EXTENT_PAGES`](crate::EXTENT_PAGES) ([`op_flags::EXTENT_2M`]).
    UnmapExtent {
        /// Context holding the BFNs.
        context: ContextId,
        /// The first BFN.
        bfn: Bfn,
    },
    /// Drop a reference to a BFN.
    Unmap {
        /// Context holding the BFN.
        context: ContextId,
        /// The BFN.
        bfn: Bfn,
    },
    /// Describe a BFN.
    Lookup {
        /// Context holding the BFN.
        context: ContextId,
        /// The BFN.
        bfn: Bfn,
    },
    /// Create a context.
    ContextCreate,
    /// Destroy an empty context.
    ContextDestroy {
        /// The context (never 0).
        context: ContextId,
    },
    /// Report the oldest unacknowledged revocation.
    RevokedNext {
        /// Report the notice's number too
        /// ([`revoked_next::NUMBERED`](crate::revoked_next::NUMBERED)).
        numbered: bool,
    },
    /// Report a revocation of one context: the oldest but `skip`
    /// ([`revoked_next::IN_CONTEXT`](crate::revoked_next::IN_CONTEXT)).
    RevokedNextIn {
        /// The caller's context whose notices are asked for.
        context: ContextId,
        /// How many of its oldest notices to pass over (at most
        /// [`revoked_next::MAX_SKIP`](crate::revoked_next::MAX_SKIP)).
        skip: u32,
        /// Report the notice's number too
        /// ([`revoked_next::NUMBERED`](crate::revoked_next::NUMBERED)).
        numbered: bool,
    },
    /// Acknowledge a revoked BFN.
    RevokedAck {
        /// Context that held the BFN.
        context: ContextId,
        /// The revoked BFN.
        bfn: Bfn,
        /// `Some`: only if the BFN's notice has this number
        /// ([`revoked_ack::NUMBERED`](crate::revoked_ack::NUMBERED)).
        notice: Option<u64>,
    },
    /// Point a device at a context.
    ContextAttach {
        /// The context (never 0).
        context: ContextId,
        /// The caller's device.
        device: Sbdf,
    },
    /// Put a device back in the default context.
    ContextDetach {
        /// The context it is attached to (never 0).
        context: ContextId,
        /// The device.
        device: Sbdf,
    },
}

impl Request {
    /// Parse and validate a raw op. Input fields that a subop does not use
    /// must be zero, so that later versions can give them meaning.
    pub fn parse(op: &PvIommuOp) -> Result<Request, Errno> {
        let context = ContextId(op.context);
        // A numbered acknowledgement is the one op with `notice` as an
        // input: the rest have it (and the padding) zero.
        if op.subop == subop::REVOKED_ACK && op.flags == revoked_ack::NUMBERED {
            if op._pad0 != 0 || op.domid != 0 || op.gfn != 0 {
                return Err(Errno::Inval);
            }
            return Ok(Request::RevokedAck {
                context,
                bfn: Bfn(op.bfn),
                notice: Some(op.notice),
            });
        }
        if !padding_clear(op) {
            return Err(Errno::Inval);
        }
        match op.subop {
            subop::MAP if op.flags & op_flags::EXTENT_2M != 0 => extent_fields(op),
            subop::MAP => map_fields(op).map(Request::Map),
            subop::UNMAP if op.flags == op_flags::EXTENT_2M => {
                if op.domid != 0 || op.gfn != 0 || !extent_aligned(op.bfn) {
                    return Err(Errno::Inval);
                }
                Ok(Request::UnmapExtent {
                    context,
                    bfn: Bfn(op.bfn),
                })
            }
            subop::UNMAP | subop::LOOKUP | subop::REVOKED_ACK => {
                if !bfn_op_fields_clear(op) {
                    return Err(Errno::Inval);
                }
                let bfn = Bfn(op.bfn);
                Ok(match op.subop {
                    subop::UNMAP => Request::Unmap { context, bfn },
                    subop::LOOKUP => Request::Lookup { context, bfn },
                    _ => Request::RevokedAck {
                        context,
                        bfn,
                        notice: None,
                    },
                })
            }
            subop::REVOKED_NEXT => {
                let numbered = op.flags & revoked_next::NUMBERED != 0;
                match op.flags & !revoked_next::NUMBERED {
                    revoked_next::IN_CONTEXT => {
                        if op.domid != 0 || op.bfn != 0 || op.gfn > revoked_next::MAX_SKIP {
                            return Err(Errno::Inval);
                        }
                        Ok(Request::RevokedNextIn {
                            context,
                            skip: op.gfn as u32,
                            numbered,
                        })
                    }
                    0 => {
                        if op.domid != 0 || op.gfn != 0 || op.bfn != 0 || op.context != 0 {
                            return Err(Errno::Inval);
                        }
                        Ok(Request::RevokedNext { numbered })
                    }
                    _ => Err(Errno::Inval),
                }
            }
            subop::CONTEXT_CREATE => {
                if op.flags != 0 || op.domid != 0 || op.gfn != 0 || op.bfn != 0 || op.context != 0 {
                    return Err(Errno::Inval);
                }
                Ok(Request::ContextCreate)
            }
            subop::CONTEXT_DESTROY => {
                if op.flags != 0 || op.domid != 0 || op.gfn != 0 || op.bfn != 0 {
                    return Err(Errno::Inval);
                }
                if context == ContextId::DEFAULT {
                    return Err(Errno::Inval);
                }
                Ok(Request::ContextDestroy { context })
            }
            subop::CONTEXT_ATTACH | subop::CONTEXT_DETACH => {
                if op.flags != 0 || op.domid != 0 || op.bfn != 0 {
                    return Err(Errno::Inval);
                }
                if context == ContextId::DEFAULT {
                    return Err(Errno::Inval);
                }
                let device = Sbdf(u32::try_from(op.gfn).map_err(|_| Errno::Inval)?);
                Ok(if op.subop == subop::CONTEXT_ATTACH {
                    Request::ContextAttach { context, device }
                } else {
                    Request::ContextDetach { context, device }
                })
            }
            _ => Err(Errno::OpNotSupp),
        }
    }

    /// `Some` exactly when [`parse`](Self::parse) gives `Ok(Request::Map)`,
    /// with the same request: for the batch's runs of maps, which only
    /// need to know whether an op is a well-formed map.
    #[inline]
    pub fn parse_map(op: &PvIommuOp) -> Option<MapRequest> {
        if op.subop != subop::MAP || !padding_clear(op) {
            return None;
        }
        map_fields(op).ok()
    }

    /// `Some((context, bfn))` exactly when [`parse`](Self::parse) gives
    /// `Ok(Request::Unmap { context, bfn })`.
    #[inline]
    pub fn parse_unmap(op: &PvIommuOp) -> Option<(ContextId, Bfn)> {
        if op.subop != subop::UNMAP || !padding_clear(op) || !bfn_op_fields_clear(op) {
            return None;
        }
        Some((ContextId(op.context), Bfn(op.bfn)))
    }

    /// `Some((context, bfn, notice))` exactly when [`parse`](Self::parse)
    /// gives `Ok(Request::RevokedAck { context, bfn, notice })`: for the
    /// batch's runs of acknowledgements.
    #[inline]
    pub fn parse_revoked_ack(op: &PvIommuOp) -> Option<(ContextId, Bfn, Option<u64>)> {
        if op.subop != subop::REVOKED_ACK {
            return None;
        }
        match Request::parse(op) {
            Ok(Request::RevokedAck {
                context,
                bfn,
                notice,
            }) => Some((context, bfn, notice)),
            _ => None,
        }
    }

    /// `Some((context, skip, numbered))` exactly when
    /// [`parse`](Self::parse) gives `Ok(Request::RevokedNextIn { .. })`
    /// with those fields: for the batch's runs of one context's notices.
    #[inline]
    pub fn parse_revoked_in(op: &PvIommuOp) -> Option<(ContextId, u32, bool)> {
        // The global form (no IN_CONTEXT) is not parsed twice.
        if op.subop != subop::REVOKED_NEXT || op.flags & revoked_next::IN_CONTEXT == 0 {
            return None;
        }
        match Request::parse(op) {
            Ok(Request::RevokedNextIn {
                context,
                skip,
                numbered,
            }) => Some((context, skip, numbered)),
            _ => None,
        }
    }

    /// Encode back into a raw op (status 0): what a guest-side client sends.
    /// (Inlined across crates: a client builds one per op.)
    #[inline]
    pub fn encode(&self) -> PvIommuOp {
        let mut op = PvIommuOp::default();
        match *self {
            Request::Map(m) => encode_map(&mut op, &m, 0),
            Request::MapExtent(m) => encode_map(&mut op, &m, op_flags::EXTENT_2M),
            Request::Unmap { context, bfn } => {
                op.subop = subop::UNMAP;
                op.context = context.0;
                op.bfn = bfn.0;
            }
            Request::UnmapExtent { context, bfn } => {
                op.subop = subop::UNMAP;
                op.flags = op_flags::EXTENT_2M;
                op.context = context.0;
                op.bfn = bfn.0;
            }
            Request::Lookup { context, bfn } => {
                op.subop = subop::LOOKUP;
                op.context = context.0;
                op.bfn = bfn.0;
            }
            Request::ContextCreate => op.subop = subop::CONTEXT_CREATE,
            Request::ContextDestroy { context } => {
                op.subop = subop::CONTEXT_DESTROY;
                op.context = context.0;
            }
            Request::RevokedNext { numbered } => {
                op.subop = subop::REVOKED_NEXT;
                op.flags = if numbered { revoked_next::NUMBERED } else { 0 };
            }
            Request::RevokedNextIn {
                context,
                skip,
                numbered,
            } => {
                op.subop = subop::REVOKED_NEXT;
                op.flags =
                    revoked_next::IN_CONTEXT | if numbered { revoked_next::NUMBERED } else { 0 };
                op.context = context.0;
                op.gfn = skip.into();
            }
            Request::RevokedAck {
                context,
                bfn,
                notice,
            } => {
                op.subop = subop::REVOKED_ACK;
                op.context = context.0;
                op.bfn = bfn.0;
                if let Some(n) = notice {
                    op.flags = revoked_ack::NUMBERED;
                    op.notice = n;
                }
            }
            Request::ContextAttach { context, device } => {
                op.subop = subop::CONTEXT_ATTACH;
                op.context = context.0;
                op.gfn = device.0.into();
            }
            Request::ContextDetach { context, device } => {
                op.subop = subop::CONTEXT_DETACH;
                op.context = context.0;
                op.gfn = device.0.into();
            }
        }
        op
    }
}

/// A map's fields into `op`, with `extra` flags.
#[inline(always)]
fn encode_map(op: &mut PvIommuOp, m: &MapRequest, extra: u16) {
    op.subop = subop::MAP;
    op.flags = m.perms.flag_bits()
        | (m.attr.field() << op_flags::ATTR_SHIFT)
        | if m.grant { op_flags::GRANT } else { 0 }
        | extra;
    op.context = m.context.0;
    op.domid = m.domid.0;
    op.gfn = m.gfn.0;
}

/// Every op: the padding and reserved fields are zero.
#[inline]
fn padding_clear(op: &PvIommuOp) -> bool {
    op._pad0 == 0 && op.notice == 0
}

/// An op that names a BFN (unmap, lookup, revoked-ack): the fields it does
/// not use are zero.
#[inline]
fn bfn_op_fields_clear(op: &PvIommuOp) -> bool {
    op.flags == 0 && op.domid == 0 && op.gfn == 0
}

/// The fields of an extent map (its subop and padding checked, and its
/// [`op_flags::EXTENT_2M`] set): those of a map of its first page, a
/// first gfn on a 2 MiB boundary whose extent does not wrap, no grant
/// (a grant reference names one page).
#[inline]
fn extent_fields(op: &PvIommuOp) -> Result<Request, Errno> {
    let m = map_fields(&PvIommuOp {
        flags: op.flags & !op_flags::EXTENT_2M,
        ..*op
    })?;
    if m.grant || !extent_aligned(m.gfn.0) || m.gfn.0 > u64::MAX - EXTENT_PAGES {
        return Err(Errno::Inval);
    }
    Ok(Request::MapExtent(m))
}

/// The fields of a map op (its subop and padding already checked).
#[inline]
fn map_fields(op: &PvIommuOp) -> Result<MapRequest, Errno> {
    if op.flags & !op_flags::VALID_MASK != 0 || op.bfn != 0 {
        return Err(Errno::Inval);
    }
    let perms = Permissions {
        read: op.flags & op_flags::READ != 0,
        write: op.flags & op_flags::WRITE != 0,
    };
    if !perms.read && !perms.write {
        return Err(Errno::Inval);
    }
    let attr = MemAttr::from_field((op.flags & op_flags::ATTR_MASK) >> op_flags::ATTR_SHIFT)
        .ok_or(Errno::Inval)?;
    let domid = DomId(op.domid);
    if !domid.is_valid() {
        return Err(Errno::Inval);
    }
    Ok(MapRequest {
        context: ContextId(op.context),
        domid,
        gfn: Gfn(op.gfn),
        perms,
        attr,
        grant: op.flags & op_flags::GRANT != 0,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    // (`prop_oneof!` of more than 10 arms builds a `vec!`.)
    use std::vec;

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (
                any::<u32>(),
                0u16..DomId::FIRST_RESERVED,
                any::<u64>(),
                1u8..4,
                0u16..3,
                any::<bool>()
            )
                .prop_map(|(c, d, g, p, a, grant)| Request::Map(MapRequest {
                    context: ContextId(c),
                    domid: DomId(d),
                    gfn: Gfn(g),
                    perms: Permissions {
                        read: p & 1 != 0,
                        write: p & 2 != 0
                    },
                    attr: MemAttr::from_field(a).unwrap(),
                    grant,
                })),
            (
                any::<u32>(),
                0u16..DomId::FIRST_RESERVED,
                0u64..=(u64::MAX / EXTENT_PAGES - 1),
                1u8..4,
                0u16..3,
            )
                .prop_map(|(c, d, e, p, a)| Request::MapExtent(MapRequest {
                    context: ContextId(c),
                    domid: DomId(d),
                    gfn: Gfn(e * EXTENT_PAGES),
                    perms: Permissions {
                        read: p & 1 != 0,
                        write: p & 2 != 0
                    },
                    attr: MemAttr::from_field(a).unwrap(),
                    grant: false,
                })),
            (any::<u32>(), any::<u64>()).prop_map(|(c, b)| Request::Unmap {
                context: ContextId(c),
                bfn: Bfn(b)
            }),
            (any::<u32>(), 0u64..=(u64::MAX / EXTENT_PAGES)).prop_map(|(c, e)| {
                Request::UnmapExtent {
                    context: ContextId(c),
                    bfn: Bfn(e * EXTENT_PAGES),
                }
            }),
            (any::<u32>(), any::<u64>()).prop_map(|(c, b)| Request::Lookup {
                context: ContextId(c),
                bfn: Bfn(b)
            }),
            Just(Request::ContextCreate),
            (1u32..).prop_map(|c| Request::ContextDestroy {
                context: ContextId(c)
            }),
            any::<bool>().prop_map(|numbered| Request::RevokedNext { numbered }),
            (
                any::<u32>(),
                0..=revoked_next::MAX_SKIP as u32,
                any::<bool>()
            )
                .prop_map(|(c, skip, numbered)| Request::RevokedNextIn {
                    context: ContextId(c),
                    skip,
                    numbered,
                }),
            (any::<u32>(), any::<u64>(), any::<Option<u64>>()).prop_map(|(c, b, notice)| {
                Request::RevokedAck {
                    context: ContextId(c),
                    bfn: Bfn(b),
                    notice,
                }
            }),
            (1u32.., any::<u32>()).prop_map(|(c, d)| Request::ContextAttach {
                context: ContextId(c),
                device: Sbdf(d)
            }),
            (1u32.., any::<u32>()).prop_map(|(c, d)| Request::ContextDetach {
                context: ContextId(c),
                device: Sbdf(d)
            }),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_parse_is_identity(req in arb_request()) {
            prop_assert_eq!(Request::parse(&req.encode()), Ok(req));
        }

        /// The run parsers agree with `parse` on valid ops and on ops with
        /// one field (padding included) set to anything.
        #[test]
        fn the_run_parsers_agree_with_parse(
            req in arb_request(),
            field in 0usize..9,
            value in any::<u64>(),
        ) {
            let mut op = req.encode();
            match field {
                0 => op.subop = value as u16,
                1 => op.flags = value as u16,
                2 => op.context = value as u32,
                3 => op.domid = value as u16,
                4 => op._pad0 = value as u16,
                5 => op.gfn = value,
                6 => op.bfn = value,
                7 => op.notice = value,
                _ => {}
            }
            let parsed = Request::parse(&op);
            let map = match parsed {
                Ok(Request::Map(m)) => Some(m),
                _ => None,
            };
            let unmap = match parsed {
                Ok(Request::Unmap { context, bfn }) => Some((context, bfn)),
                _ => None,
            };
            let ack = match parsed {
                Ok(Request::RevokedAck { context, bfn, notice }) => Some((context, bfn, notice)),
                _ => None,
            };
            let notice_in = match parsed {
                Ok(Request::RevokedNextIn { context, skip, numbered }) => {
                    Some((context, skip, numbered))
                }
                _ => None,
            };
            prop_assert_eq!(Request::parse_map(&op), map);
            prop_assert_eq!(Request::parse_unmap(&op), unmap);
            prop_assert_eq!(Request::parse_revoked_ack(&op), ack);
            prop_assert_eq!(Request::parse_revoked_in(&op), notice_in);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 40)) {
            let op = <PvIommuOp as zerocopy::FromBytes>::read_from_bytes(&bytes).unwrap();
            let _ = Request::parse(&op);
        }
    }

    /// An extent's first frame is on a 2 MiB boundary, its map is of
    /// frames (no grant) whose extent does not wrap, its unmap names nothing
    /// but the context and the first BFN; and neither is ever taken for a
    /// map or an unmap of one page (which the batch's runs take).
    #[test]
    fn an_extent_op_is_aligned_and_never_a_page_op() {
        let map = MapRequest {
            context: ContextId(1),
            domid: DomId(3),
            gfn: Gfn(512 * 7),
            perms: Permissions::RW,
            attr: MemAttr::WriteBack,
            grant: false,
        };
        let good = Request::MapExtent(map).encode();
        assert_eq!(Request::parse(&good), Ok(Request::MapExtent(map)));
        assert_eq!(Request::parse_map(&good), None);
        let last = PvIommuOp {
            gfn: u64::MAX - 2 * EXTENT_PAGES + 1,
            ..good
        };
        assert!(matches!(Request::parse(&last), Ok(Request::MapExtent(_))));
        for bad in [
            PvIommuOp {
                gfn: 512 * 7 + 1,
                ..good
            },
            PvIommuOp { gfn: 256, ..good },
            PvIommuOp {
                gfn: u64::MAX - EXTENT_PAGES + 1,
                ..good
            },
            PvIommuOp {
                flags: good.flags | op_flags::GRANT,
                ..good
            },
            PvIommuOp { bfn: 512, ..good },
            PvIommuOp {
                flags: op_flags::EXTENT_2M,
                ..good
            },
        ] {
            assert_eq!(Request::parse(&bad), Err(Errno::Inval), "{bad:?}");
            assert_eq!(Request::parse_map(&bad), None);
        }
        let unmap = Request::UnmapExtent {
            context: ContextId(1),
            bfn: Bfn(1 << 30),
        }
        .encode();
        assert_eq!(
            Request::parse(&unmap),
            Ok(Request::UnmapExtent {
                context: ContextId(1),
                bfn: Bfn(1 << 30)
            })
        );
        assert_eq!(Request::parse_unmap(&unmap), None);
        for bad in [
            PvIommuOp {
                bfn: (1 << 30) + 8,
                ..unmap
            },
            PvIommuOp { domid: 1, ..unmap },
            PvIommuOp { gfn: 1, ..unmap },
            PvIommuOp {
                flags: op_flags::EXTENT_2M | op_flags::READ,
                ..unmap
            },
        ] {
            assert_eq!(Request::parse(&bad), Err(Errno::Inval), "{bad:?}");
            assert_eq!(Request::parse_unmap(&bad), None);
        }
    }

    #[test]
    fn revoked_next_in_a_context_takes_a_bounded_skip_and_nothing_else() {
        let next = |context, skip| {
            Request::RevokedNextIn {
                context,
                skip,
                numbered: false,
            }
            .encode()
        };
        let op = next(ContextId(3), revoked_next::MAX_SKIP as u32);
        assert_eq!(
            Request::parse(&op),
            Ok(Request::RevokedNextIn {
                context: ContextId(3),
                skip: revoked_next::MAX_SKIP as u32,
                numbered: false,
            })
        );
        let good = next(ContextId(0), 0);
        for bad in [
            PvIommuOp {
                gfn: revoked_next::MAX_SKIP + 1,
                ..good
            },
            PvIommuOp {
                gfn: u64::MAX,
                ..good
            },
            PvIommuOp { bfn: 1, ..good },
            PvIommuOp { domid: 1, ..good },
            PvIommuOp {
                flags: revoked_next::IN_CONTEXT | 4,
                ..good
            },
            PvIommuOp { flags: 4, ..good },
            PvIommuOp {
                flags: revoked_next::IN_CONTEXT | revoked_next::NUMBERED | 4,
                ..good
            },
            // The number is an output of revoked_next.
            PvIommuOp { notice: 1, ..good },
            PvIommuOp {
                flags: revoked_next::IN_CONTEXT | revoked_next::NUMBERED,
                notice: 1,
                ..good
            },
            // Without the flag, context and gfn stay outputs only.
            PvIommuOp {
                flags: 0,
                context: 1,
                ..good
            },
            PvIommuOp {
                flags: 0,
                gfn: 1,
                ..good
            },
        ] {
            assert_eq!(Request::parse(&bad), Err(Errno::Inval), "{bad:?}");
        }
        // Skip 0, context 0 without the flag is the global form.
        assert_eq!(
            Request::parse(&PvIommuOp {
                flags: 0,
                gfn: 0,
                ..good
            }),
            Ok(Request::RevokedNext { numbered: false })
        );
    }

    #[test]
    fn a_numbered_acknowledgement_takes_the_number_and_nothing_else() {
        let ack = |notice| {
            Request::RevokedAck {
                context: ContextId(2),
                bfn: Bfn(0x1234),
                notice,
            }
            .encode()
        };
        for n in [0, 1, u64::MAX] {
            let op = ack(Some(n));
            assert_eq!(op.flags, revoked_ack::NUMBERED);
            assert_eq!(op.notice, n);
            assert_eq!(
                Request::parse(&op),
                Ok(Request::RevokedAck {
                    context: ContextId(2),
                    bfn: Bfn(0x1234),
                    notice: Some(n)
                })
            );
        }
        let good = ack(Some(7));
        for bad in [
            PvIommuOp { domid: 1, ..good },
            PvIommuOp { gfn: 1, ..good },
            PvIommuOp { _pad0: 1, ..good },
            PvIommuOp {
                flags: revoked_ack::NUMBERED | revoked_next::IN_CONTEXT,
                ..good
            },
            PvIommuOp { flags: 4, ..good },
            // Without the flag the number must be zero.
            PvIommuOp { flags: 0, ..good },
        ] {
            assert_eq!(Request::parse(&bad), Err(Errno::Inval), "{bad:?}");
        }
        // The number is an input of revoked_ack only: unmap and lookup
        // refuse it, whatever their flags.
        for subop in [subop::UNMAP, subop::LOOKUP] {
            for flags in [0, revoked_ack::NUMBERED] {
                let op = PvIommuOp {
                    subop,
                    flags,
                    ..good
                };
                assert_eq!(Request::parse(&op), Err(Errno::Inval), "{op:?}");
            }
        }
        // Numbered, without IN_CONTEXT: the global form.
        let op = Request::RevokedNext { numbered: true }.encode();
        assert_eq!(op.flags, revoked_next::NUMBERED);
        assert_eq!(
            Request::parse(&op),
            Ok(Request::RevokedNext { numbered: true })
        );
    }

    #[test]
    fn rejects_nonzero_padding_unknown_flags_and_subops() {
        let good = Request::Map(MapRequest {
            context: ContextId(0),
            domid: DomId(1),
            gfn: Gfn(5),
            perms: Permissions::RO,
            attr: MemAttr::WriteBack,
            grant: false,
        })
        .encode();
        assert!(Request::parse(&good).is_ok());
        let mut op = good;
        op._pad0 = 1;
        assert_eq!(Request::parse(&op), Err(Errno::Inval));
        let mut op = good;
        op.flags |= 1 << 5;
        assert_eq!(Request::parse(&op), Err(Errno::Inval));
        let mut op = good;
        op.flags = 0; // neither read nor write
        assert_eq!(Request::parse(&op), Err(Errno::Inval));
        let mut op = good;
        op.flags |= 7 << op_flags::ATTR_SHIFT;
        assert_eq!(Request::parse(&op), Err(Errno::Inval));
        let mut op = good;
        op.domid = 0x7ff0;
        assert_eq!(Request::parse(&op), Err(Errno::Inval));
        let mut op = good;
        op.subop = 99;
        assert_eq!(Request::parse(&op), Err(Errno::OpNotSupp));
        let destroy_default = PvIommuOp {
            subop: subop::CONTEXT_DESTROY,
            ..Default::default()
        };
        assert_eq!(Request::parse(&destroy_default), Err(Errno::Inval));
        let attach = Request::ContextAttach {
            context: ContextId(1),
            device: Sbdf(0x0010),
        }
        .encode();
        assert!(Request::parse(&attach).is_ok());
        for bad in [
            PvIommuOp {
                context: 0,
                ..attach
            },
            PvIommuOp {
                gfn: 1 << 32,
                ..attach
            },
            PvIommuOp { bfn: 1, ..attach },
            PvIommuOp { domid: 1, ..attach },
            PvIommuOp { flags: 1, ..attach },
        ] {
            assert_eq!(Request::parse(&bad), Err(Errno::Inval), "{bad:?}");
        }
    }

    struct Cursor<'a, 'b>(&'a mut &'b mut [u8]);
    impl core::fmt::Write for Cursor<'_, '_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let buf = core::mem::take(self.0);
            let (head, tail) = buf.split_at_mut(s.len().min(buf.len()));
            head.copy_from_slice(&s.as_bytes()[..head.len()]);
            *self.0 = tail;
            Ok(())
        }
    }

    #[test]
    fn sbdf_parses_and_prints_as_lspci_does() {
        let d: Sbdf = "0000:00:03.0".parse().unwrap();
        assert_eq!(d, Sbdf(0x18));
        let mut printed = [0u8; 16];
        let mut w = &mut printed[..];
        core::fmt::Write::write_fmt(&mut Cursor(&mut w), format_args!("{d}")).unwrap();
        assert_eq!(&printed[..12], b"0000:00:03.0");
        assert_eq!("01:1f.7".parse::<Sbdf>(), Ok(Sbdf(0x1ff)));
        for bad in [
            "",
            "00:20.0",
            "00:03.8",
            "0:0:0:0.0",
            "00:03",
            "000:03.0",
            "00:03.00",
            "zz:00.0",
        ] {
            assert_eq!(bad.parse::<Sbdf>(), Err(()), "{bad}");
        }
    }

    #[test]
    fn errno_codes_round_trip() {
        for e in Errno::ALL {
            assert_eq!(Errno::from_code(e.negated()), Some(e));
        }
        assert_eq!(Errno::from_code(i32::MIN), None);
        assert_eq!(Errno::from_code(0), None);
    }
}
