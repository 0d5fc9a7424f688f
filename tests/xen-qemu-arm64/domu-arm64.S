/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * domu-arm64.S -- a minimal AArch64 guest for a dom0less domU (Xen 4.17 on
 * arm64, the CI fallback of issue 13): an arm64 Image header (Xen's
 * kernel_zimage64_probe), then, with the MMU off (VA = IPA):
 *
 *  1. fills the page at IPA KNOWN_ADDR (gfn 0x40400) with known words:
 *     word i = PATTERN ^ i (i = 0..511), the bytes dom0 must find at the
 *     BFN it maps this gfn to;
 *  2. calls hypercall 43 itself, as the unprivileged domain it is
 *     (query_caps, then batch): both must be refused with -EPERM (-1) at
 *     entry, before any guest copy (the buffers are never read);
 *  3. prints the results on its vpl011 (Xen's backend prints them on the
 *     host console as "DOM1: ..."), then waits in WFI forever.
 *
 * Built with aarch64-linux-gnu-as/ld/objcopy into a raw binary by
 * tests/xen-qemu-arm64/run.sh.
 */
#define KNOWN_ADDR  0x40400000
#define PATTERN     0x5056494f4d4d5500  /* "\0UMMOIVP" */
#define PL011       0x22000000          /* GUEST_PL011_BASE */
#define HYPERVISOR_pv_iommu_op 43
#define XEN_HYPERCALL_TAG 0xea1

    .text
    .globl _start
_start:
    b       entry                       /* code0 */
    .long   0                           /* code1 */
    .quad   0x80000                     /* text_offset */
    .quad   image_end - _start          /* image_size */
    .quad   0x2                         /* flags: little-endian, 4K pages */
    .quad   0, 0, 0                     /* res2-4 */
    .ascii  "ARM\x64"                   /* magic */
    .long   0                           /* res5 */

entry:
    /* 1. the known page */
    ldr     x1, =KNOWN_ADDR
    ldr     x3, =PATTERN
    mov     x2, #0
1:  eor     x4, x3, x2
    str     x4, [x1, x2, lsl #3]
    add     x2, x2, #1
    cmp     x2, #512
    b.lt    1b
    dsb     sy

    /* 2. hypercall 43 from an unprivileged domain */
    mov     x0, #1                      /* PVIOMMU_CMD_query_caps */
    adr     x1, buf
    mov     x16, #HYPERVISOR_pv_iommu_op
    hvc     #XEN_HYPERCALL_TAG
    mov     x19, x0
    mov     x0, #2                      /* PVIOMMU_CMD_batch */
    adr     x1, buf
    mov     x16, #HYPERVISOR_pv_iommu_op
    hvc     #XEN_HYPERCALL_TAG
    mov     x20, x0

    /* 3. report */
    adr     x0, m_known
    bl      puts
    adr     x0, m_caps
    bl      puts
    mov     x0, x19
    bl      puthex
    adr     x0, m_batch
    bl      puts
    mov     x0, x20
    bl      puthex
    adr     x0, m_nl
    bl      puts
2:  wfi
    b       2b

/* puts: x0 = NUL-terminated string, on the vpl011 (UARTDR 0x0, UARTFR 0x18) */
puts:
    ldr     x9, =PL011
3:  ldrb    w10, [x0], #1
    cbz     w10, 5f
4:  ldr     w11, [x9, #0x18]
    tbnz    w11, #5, 4b                 /* TXFF */
    str     w10, [x9]
    b       3b
5:  ret

/* puthex: x0 as "0x" and 16 hex digits */
puthex:
    mov     x12, x0
    mov     x15, x30
    adr     x0, m_0x
    bl      puts
    ldr     x9, =PL011
    mov     x13, #60
6:  lsr     x14, x12, x13
    and     x14, x14, #0xf
    cmp     x14, #10
    b.lt    7f
    add     x14, x14, #('a' - 10)
    b       8f
7:  add     x14, x14, #'0'
8:  ldr     w11, [x9, #0x18]
    tbnz    w11, #5, 8b
    str     w14, [x9]
    subs    x13, x13, #4
    b.ge    6b
    mov     x30, x15
    ret

    .ltorg
m_known: .asciz "PVIOMMU-DOMU: known page at gfn 0x40400 filled (word i = 0x5056494f4d4d5500 ^ i)\n"
m_caps:  .asciz "PVIOMMU-DOMU: unprivileged hypercall 43 query_caps rc="
m_batch: .asciz " batch rc="
m_nl:    .asciz "\n"
m_0x:    .asciz "0x"
    .balign 64
buf:     .fill 128, 1, 0
    .balign 8
image_end:
