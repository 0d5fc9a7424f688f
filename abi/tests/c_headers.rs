//! The two C headers, `include/pviommu.h` (guests) and Xen's
//! `public/pv-iommu.h`, give every constant the value this crate does.
//! The structure layouts are checked elsewhere (`LAYOUT`, Xen's
//! `BUILD_BUG_ON`s); this checks the numbers a guest and Xen must agree on.

use std::collections::HashMap;
use std::path::Path;

use pviommu_abi::*;

/// `#define NAME value` lines of a header, continuation lines joined and
/// comments dropped, each value evaluated (literals with `u`/`U`, `<<`,
/// `|`, parentheses, earlier names).
fn defines(path: &Path) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut joined = String::new();
    for line in text.lines() {
        match line.strip_suffix('\\') {
            Some(head) => joined.push_str(head),
            None => {
                joined.push_str(line);
                joined.push('\n');
            }
        }
    }
    let mut values = HashMap::new();
    for line in joined.lines() {
        let Some(rest) = line.trim_start().strip_prefix("#define ") else {
            continue;
        };
        let rest = rest.split("/*").next().unwrap_or("");
        let (name, expr) = rest
            .trim()
            .split_once(char::is_whitespace)
            .unwrap_or((rest.trim(), ""));
        if !name.starts_with("PVIOMMU_") || name.contains('(') || expr.trim().is_empty() {
            continue;
        }
        let tokens = tokenize(expr);
        let mut at = 0;
        let v = or_expr(&tokens, &mut at, &values)
            .unwrap_or_else(|| panic!("{}: cannot evaluate {name} = {expr}", path.display()));
        assert_eq!(
            at,
            tokens.len(),
            "{}: trailing tokens in {name}",
            path.display()
        );
        values.insert(name.to_string(), v);
    }
    values
}

fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let mut t = String::new();
            while let Some(&c) = chars
                .peek()
                .filter(|c| c.is_ascii_alphanumeric() || **c == '_')
            {
                t.push(c);
                chars.next();
            }
            out.push(t);
        } else if c == '<' {
            chars.next();
            assert_eq!(chars.next(), Some('<'), "only << is understood");
            out.push("<<".into());
        } else {
            out.push(c.to_string());
            chars.next();
        }
    }
    out
}

fn or_expr(t: &[String], at: &mut usize, names: &HashMap<String, u64>) -> Option<u64> {
    let mut v = shift_expr(t, at, names)?;
    while t.get(*at).map(String::as_str) == Some("|") {
        *at += 1;
        v |= shift_expr(t, at, names)?;
    }
    Some(v)
}

fn shift_expr(t: &[String], at: &mut usize, names: &HashMap<String, u64>) -> Option<u64> {
    let mut v = atom(t, at, names)?;
    while t.get(*at).map(String::as_str) == Some("<<") {
        *at += 1;
        v = v.checked_shl(u32::try_from(atom(t, at, names)?).ok()?)?;
    }
    Some(v)
}

fn atom(t: &[String], at: &mut usize, names: &HashMap<String, u64>) -> Option<u64> {
    let tok = t.get(*at)?;
    *at += 1;
    if tok == "(" {
        let v = or_expr(t, at, names)?;
        (t.get(*at).map(String::as_str) == Some(")")).then_some(())?;
        *at += 1;
        return Some(v);
    }
    if let Some(v) = names.get(tok) {
        return Some(*v);
    }
    let digits = tok.trim_end_matches(['u', 'U']);
    match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => digits.parse().ok(),
    }
}

/// Every constant both headers define, with this crate's value.
fn expected() -> Vec<(&'static str, u64)> {
    vec![
        ("PVIOMMU_INTERFACE_VERSION", INTERFACE_VERSION.into()),
        ("PVIOMMU_CMD_query_caps", cmd::QUERY_CAPS.into()),
        ("PVIOMMU_CMD_batch", cmd::BATCH.into()),
        ("PVIOMMU_CMD_reserved_regions", cmd::RESERVED_REGIONS.into()),
        ("PVIOMMU_CMD_set_limits", cmd::SET_LIMITS.into()),
        ("PVIOMMU_CMD_stats", cmd::STATS.into()),
        ("PVIOMMU_CMD_entry", cmd::ENTRY.into()),
        ("PVIOMMU_BATCH_INCOMPLETE", BATCH_INCOMPLETE as u64),
        ("PVIOMMU_FEAT_CONTEXTS", feature::CONTEXTS.into()),
        ("PVIOMMU_FEAT_ATTR_UC", feature::ATTR_UC.into()),
        ("PVIOMMU_FEAT_ATTR_DEVICE", feature::ATTR_DEVICE.into()),
        ("PVIOMMU_FEAT_GRANT", feature::GRANT.into()),
        (
            "PVIOMMU_FEAT_REVOCATION_QUEUE",
            feature::REVOCATION_QUEUE.into(),
        ),
        ("PVIOMMU_FEAT_DEVICE_ATTACH", feature::DEVICE_ATTACH.into()),
        (
            "PVIOMMU_FEAT_REVOKED_IN_CONTEXT",
            feature::REVOKED_IN_CONTEXT.into(),
        ),
        ("PVIOMMU_FEAT_ALL", feature::ALL.into()),
        ("PVIOMMU_TRANSLATES", translation::TRANSLATES.into()),
        ("PVIOMMU_NO_IOMMU", translation::NO_IOMMU.into()),
        ("PVIOMMU_PASSTHROUGH", translation::PASSTHROUGH.into()),
        ("PVIOMMU_RELAXED", translation::RELAXED.into()),
        ("PVIOMMU_SHARED_PT", translation::SHARED_PT.into()),
        ("PVIOMMU_MIRRORS_P2M", translation::MIRRORS_P2M.into()),
        ("PVIOMMU_OP_map", subop::MAP.into()),
        ("PVIOMMU_OP_unmap", subop::UNMAP.into()),
        ("PVIOMMU_OP_lookup", subop::LOOKUP.into()),
        ("PVIOMMU_OP_context_create", subop::CONTEXT_CREATE.into()),
        ("PVIOMMU_OP_context_destroy", subop::CONTEXT_DESTROY.into()),
        ("PVIOMMU_OP_revoked_next", subop::REVOKED_NEXT.into()),
        ("PVIOMMU_OP_revoked_ack", subop::REVOKED_ACK.into()),
        ("PVIOMMU_OP_context_attach", subop::CONTEXT_ATTACH.into()),
        ("PVIOMMU_OP_context_detach", subop::CONTEXT_DETACH.into()),
        (
            "PVIOMMU_REVOKED_IN_CONTEXT",
            revoked_next::IN_CONTEXT.into(),
        ),
        ("PVIOMMU_REVOKED_MAX_SKIP", revoked_next::MAX_SKIP),
        ("PVIOMMU_F_READ", op_flags::READ.into()),
        ("PVIOMMU_F_WRITE", op_flags::WRITE.into()),
        ("PVIOMMU_F_GRANT", op_flags::GRANT.into()),
        ("PVIOMMU_ATTR_SHIFT", op_flags::ATTR_SHIFT.into()),
        ("PVIOMMU_ATTR_MASK", op_flags::ATTR_MASK.into()),
        ("PVIOMMU_F_VALID_MASK", op_flags::VALID_MASK.into()),
        ("PVIOMMU_ATTR_WB", MemAttr::WriteBack.field().into()),
        ("PVIOMMU_ATTR_UC", MemAttr::Uncached.field().into()),
        ("PVIOMMU_ATTR_DEVICE", MemAttr::Device.field().into()),
        ("PVIOMMU_REGION_MSI", region_kind::MSI.into()),
        ("PVIOMMU_REGION_RMRR", region_kind::RMRR.into()),
        ("PVIOMMU_REGION_MMIO", region_kind::MMIO.into()),
        ("PVIOMMU_REGION_PLATFORM", region_kind::PLATFORM.into()),
        ("PVIOMMU_STATS_RESET", stats_flag::RESET.into()),
        ("PVIOMMU_STATS_TIMING_ON", stats_flag::TIMING_ON.into()),
        ("PVIOMMU_STATS_TIMING_OFF", stats_flag::TIMING_OFF.into()),
        (
            "PVIOMMU_ENTRY_VTD_SECOND_LEVEL",
            entry_format::VTD_SECOND_LEVEL.into(),
        ),
        (
            "PVIOMMU_ENTRY_ARM_LPAE_STAGE2",
            entry_format::ARM_LPAE_STAGE2.into(),
        ),
    ]
}

fn check(path: &Path, extra: &[(&str, u64)]) {
    let got = defines(path);
    let want: Vec<(&str, u64)> = expected()
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    for (name, value) in &want {
        assert_eq!(got.get(*name), Some(value), "{}: {name}", path.display());
    }
    // Nothing defined there that this crate does not know.
    for name in got.keys() {
        assert!(
            want.iter().any(|(n, _)| n == name),
            "{}: {name} has no Rust counterpart checked here",
            path.display()
        );
    }
}

#[test]
fn the_guests_c_header_agrees_with_the_crate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    check(
        &dir.join("include/pviommu.h"),
        &[("PVIOMMU_VIRQ", VIRQ_PV_IOMMU.into())],
    );
}

#[test]
fn xens_public_header_agrees_with_the_crate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    check(&dir.join("../hypervisor-side/xen/public/pv-iommu.h"), &[]);
}
