#!/usr/bin/env python3
"""analyze.py -- per-function tables from xenprof.so snapshots.

usage: analyze.py XENPROF_OUT XEN_SYMS LONG_SYMS_MAP PAGES [--intervals] [--pass NAME:A:B ...]

Snapshot k is taken at the k-th entry of the marker (perfc_control); the
interval A->B is snapshot B minus snapshot A.
"""
import bisect, re, subprocess, sys, collections

def load_syms(xen_syms, long_map):
    long2short = {}
    short2long = {}
    for line in open(long_map):
        parts = line.split()
        if len(parts) == 2:
            short2long[parts[1]] = parts[0]
    out = subprocess.run(['nm', '-n', '-S', xen_syms], capture_output=True, text=True).stdout
    syms = []
    for line in out.splitlines():
        p = line.split()
        if len(p) == 4:
            addr, size, typ, name = int(p[0], 16), int(p[1], 16), p[2], p[3]
        elif len(p) == 3:
            addr, size, typ, name = int(p[0], 16), 0, p[1], p[2]
        else:
            continue
        if typ not in 'tTwW':
            continue
        syms.append((addr, size, name))
    syms.sort()
    # demangle rust names (and renamed ones) in one c++filt call
    names = sorted({short2long.get(n, n) for _, _, n in syms if n.startswith('_R') or n in short2long})
    dem = {}
    if names:
        r = subprocess.run(['c++filt'], input='\n'.join(names) + '\n', capture_output=True, text=True).stdout.splitlines()
        for a, b in zip(names, r):
            b = re.sub(r'\[[0-9a-f]{16}\]', '', b)
            dem[a] = b
    def pretty(n):
        ln = short2long.get(n, n)
        if ln in dem:
            d = dem[ln]
            return (n + ' = ' if n != ln else '') + d
        return n
    return syms, pretty

def load_snaps(path):
    snaps = []
    cur = None
    for line in open(path):
        if line.startswith('#'):
            continue
        if line.startswith('S '):
            f = line.split()
            kv = dict(x.split('=') for x in f[3:])
            cur = {'n': int(f[1]), 'why': f[2], 'other_tbs': int(kv['other_tbs']),
                   'other_insns': int(kv['other_insns']), 'rows': {}}
            continue
        if line.startswith('E'):
            snaps.append(cur)
            cur = None
            continue
        if cur is not None:
            f = line.split()
            cur['rows'][(int(f[0], 16), int(f[1]))] = int(f[2])
            if len(f) >= 5:
                cur.setdefault('cpu', {})[(int(f[0], 16), int(f[1]))] = (int(f[3]), int(f[4]))
    return snaps

def delta(a, b):
    d = {}
    for k, c in b['rows'].items():
        x = c - a['rows'].get(k, 0)
        if x:
            d[k] = x
    return d, b['other_tbs'] - a['other_tbs'], b['other_insns'] - a['other_insns']

def delta_cpu(a, b):
    # per-vCPU TB execs per (vaddr, ninsns), when the run had percpu=1
    if 'cpu' not in b:
        return None
    d = {}
    for k, (c0, c1) in b['cpu'].items():
        a0, a1 = a.get('cpu', {}).get(k, (0, 0))
        if c0 - a0 or c1 - a1:
            d[k] = (c0 - a0, c1 - a1)
    return d

class Resolver:
    def __init__(self, syms):
        self.syms = syms
        self.addrs = [s[0] for s in syms]
    def __call__(self, va):
        i = bisect.bisect_right(self.addrs, va) - 1
        if i < 0:
            return '?%x' % va, None
        addr, size, name = self.syms[i]
        if size and va >= addr + size:
            # past the symbol's end: outside known text (stubs etc.)
            return '?%x+' % (va & ~0xfff), None
        return name, addr

def per_func(d, res):
    f = collections.defaultdict(lambda: [0, 0, 0])  # insns, tbexecs, entry execs
    for (va, ni), c in d.items():
        name, start = res(va)
        e = f[name]
        e[0] += c * ni
        e[1] += c
        if start == va:
            e[2] += c
    return f

def main():
    args = sys.argv[1:]
    outp, xsyms, lmap, pages = args[0], args[1], args[2], int(args[3])
    syms, pretty = load_syms(xsyms, lmap)
    res = Resolver(syms)
    snaps = load_snaps(outp)
    byname = {n: a for a, _, n in syms}
    if '--intervals' in args:
        keys = ['do_pv_iommu_op', 'do_mmu_update', 'do_sysctl', 'pviommu_engine_op']
        print('# snapshots: %d' % len(snaps))
        for i in range(len(snaps) - 1):
            d, ot, oi = delta(snaps[i], snaps[i + 1])
            tot = sum(c * ni for (va, ni), c in d.items())
            ent = {k: sum(c for (va, ni), c in d.items() if va == byname.get(k)) for k in keys}
            print('%3d->%3d xen_insns=%12d xen_tbs=%11d other_insns=%12d %s' % (
                i, i + 1, tot, sum(d.values()), oi, ' '.join('%s=%d' % kv for kv in ent.items())))
    for spec in [a for a in args if a.startswith('--pass=')]:
        name, a, b = spec[len('--pass='):].split(':')
        a, b = int(a), int(b)
        d, ot, oi = delta(snaps[a], snaps[b])
        f = per_func(d, res)
        dc = delta_cpu(snaps[a], snaps[b])
        fc = collections.defaultdict(lambda: [0, 0, 0, 0])  # insns cpu0, cpu1, tbs cpu0, cpu1
        if dc:
            for (va, ni), (c0, c1) in dc.items():
                e = fc[res(va)[0]]
                e[0] += c0 * ni; e[1] += c1 * ni; e[2] += c0; e[3] += c1
        ti = sum(v[0] for v in f.values())
        tt = sum(v[1] for v in f.values())
        print('\n## %s: snapshots %d->%d, %d pages' % (name, a, b, pages))
        print('Xen total: %.1f guest insns/page, %.1f TB execs/page; outside Xen (dom0 kernel+user): %.1f insns/page, %.1f TB execs/page' % (
            ti / pages, tt / pages, oi / pages, ot / pages))
        if dc:
            print('per vCPU: vCPU0 %.1f insns/page %.1f TB execs/page; vCPU1 %.1f insns/page %.1f TB execs/page' % (
                sum(v[0] for v in fc.values()) / pages, sum(v[2] for v in fc.values()) / pages,
                sum(v[1] for v in fc.values()) / pages, sum(v[3] for v in fc.values()) / pages))
        print('\n| # | function | insns/page | %% of Xen | TB execs/page | entries/page |%s' % (' TB execs/page vCPU0 / vCPU1 |' if dc else ''))
        print('|---|---|---:|---:|---:|---:|%s' % ('---:|' if dc else ''))
        top = sorted(f.items(), key=lambda kv: -kv[1][0])
        for i, (fn, v) in enumerate(top[:40]):
            print('| %d | %s | %.1f | %.1f | %.2f | %.2f |%s' % (
                i + 1, pretty(fn)[:110], v[0] / pages, 100.0 * v[0] / ti, v[1] / pages, v[2] / pages,
                (' %.2f / %.2f |' % (fc[fn][2] / pages, fc[fn][3] / pages)) if dc else ''))
        rest = top[40:]
        print('| | (other %d functions) | %.1f | %.1f | %.2f | |' % (
            len(rest), sum(v[0] for _, v in rest) / pages, 100.0 * sum(v[0] for _, v in rest) / ti,
            sum(v[1] for _, v in rest) / pages))
        # categories (by function name; first match wins)
        cats = [
            ('spin-wait / locks (spin_lock*, _spin_unlock*)', r'^_?spin_|^_spin_'),
            ('TLB-flush IPI wait (flush_area_mask, __bitmap_empty, send_IPI*, flush_area_local)', r'^(flush_area_mask|__bitmap_empty|send_IPI|flush_area_local|flush_mask)'),
            ('return thunk', r'^__x86_return_thunk$'),
            ('hypercall entry/exit/dispatch', r'^(lstar_enter|pv_hypercall|restore_all_guest|test_all_events|do_pv_iommu_op|pviommu_engine_op|pviommu_rs_sym_5$|handle_exception|entry_|syscall_enter|switch_to_kernel|__x86_indirect_thunk|compat_)'),
            ('guest copies + op-buffer zeroing (copy_*_guest*, pvx_copy_*, memset, memcpy)', r'^(copy_|pvx_copy_|memset|memcpy|raw_copy|__copy)'),
            ('domain lookup / XSM (rcu_lock_domain*, pvx_xsm_check, pvx_domain_info, xsm)', r'^(rcu_lock_domain|pvx_xsm_check|pvx_domain_info|xsm_|dummy_|get_pg_owner|put_pg_owner|rcu_unlock)'),
            ('page reference (pvx_get_page, get_page*, _get_page_type, __mfn_valid, page_lock*, put_page*)', r'^(pvx_get_page|pvx_put_page|get_page|_get_page_type|_put_page_type|put_page|__mfn_valid|page_lock|page_unlock|get_page_from_gfn|p2m_)'),
            ('PTE write (do_mmu_update, mod_l1_entry, rangeset; get_page_from_l1e counts as page reference)', r'^(mod_l1_entry|do_mmu_update|rangeset_|map_domain_page|unmap_domain_page|update_intpte|do_mmuext_op|put_old_guest_table)'),
            ('engine table write (write_entry, leaf_entry, DirtyLines, table map/sync)', r'(write_entry|leaf_entry|DirtyLines|pvx_table_|TableMemory|PageTableFormat|IoPageTable|read_entry)'),
            ('engine index growth + allocator (grow, try_from_fn, split_into_shards, xmalloc, heap)', r'(grow|try_from_fn|try_filled|split_into_shards|xmem_pool|_xmalloc|xfree|finish_grow|alloc_heap|get_free_buddy|clear_page|pvx_alloc|pvx_free|__rust_|alloc_domheap|free_heap|free_domheap|page_list|mark_page_free|reserve_offlined|_xzalloc|RawVec)'),
            ('engine bookkeeping (other Rust + pvx_driver_*)', r'(^_R|^pviommu_rs_sym|^pvx_driver|^pvx_)'),
            ('other', r''),
        ]
        cat_tot = collections.OrderedDict((c, [0, 0]) for c, _ in cats)
        for fn, v in f.items():
            for c, rx in cats:
                if re.search(rx, fn) or re.search(rx, pretty(fn)):
                    cat_tot[c][0] += v[0]; cat_tot[c][1] += v[1]
                    break
        print('\n| category | insns/page | TB execs/page |')
        print('|---|---:|---:|')
        for c, v in cat_tot.items():
            print('| %s | %.1f | %.2f |' % (c, v[0] / pages, v[1] / pages))
        # families
        fams = collections.OrderedDict([
            ('__x86_return_thunk', lambda n: n == '__x86_return_thunk'),
            ('__x86_indirect_thunk_*', lambda n: n.startswith('__x86_indirect_thunk')),
            ('spin_lock family (_spin_lock*, _spin_trylock*, spin_lock_*)',
             lambda n: re.match(r'^_?spin_(lock|trylock)', n) is not None),
            ('_spin_unlock*', lambda n: n.startswith('_spin_unlock')),
            ('rw/percpu locks (_read_*/_write_*/_percpu_*)', lambda n: re.match(r'^_(read|write|percpu)_', n) is not None),
            ('rcu_lock/rcu_unlock/rcu_read_*', lambda n: 'rcu' in n),
        ])
        print('\nfamilies (per page): TB execs / insns; members')
        for fam, pred in fams.items():
            mem = [(fn, v) for fn, v in f.items() if pred(fn)]
            print('- %s: %.2f TB execs, %.1f insns; %s' % (
                fam, sum(v[1] for _, v in mem) / pages, sum(v[0] for _, v in mem) / pages,
                ', '.join('%s %.2f' % (fn, v[1] / pages) for fn, v in sorted(mem, key=lambda x: -x[1][1]) if v[1] / pages >= 0.01)))
        # engine share
        eng = [(fn, v) for fn, v in f.items() if fn.startswith('_R') or fn.startswith('pviommu_rs_sym') or fn.startswith('pviommu_engine')]
        glue = [(fn, v) for fn, v in f.items() if fn.startswith('pvx_') or fn.startswith('do_pv_iommu') or fn.startswith('pviommu_')  and not fn.startswith('pviommu_rs_sym') and not fn.startswith('pviommu_engine')]
        print('- Rust engine functions: %.1f insns/page, %.2f TB execs/page (%d functions)' % (
            sum(v[0] for _, v in eng) / pages, sum(v[1] for _, v in eng) / pages, len(eng)))
        print('- C glue pvx_*/do_pv_iommu_op/pviommu_*: %.1f insns/page, %.2f TB execs/page' % (
            sum(v[0] for _, v in glue) / pages, sum(v[1] for _, v in glue) / pages))

main()
