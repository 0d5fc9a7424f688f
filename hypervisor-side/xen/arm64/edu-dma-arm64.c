/*
 * edu-dma-arm64.c -- from dom0 user space, drive QEMU's edu device and
 * check that its DMA reaches dom0's own pages through the SMMU, and that a
 * bus address outside dom0's RAM does not reach anything.
 *
 * dom0 on Xen/Arm is direct-mapped (guest physical == machine address), and
 * the SMMU context Xen gives dom0's devices is dom0's stage-2 (shared p2m),
 * so a page's guest frame from /proc/self/pagemap is its bus address.
 *
 * Prints "EDU-DMA: PASS ..." / "EDU-DMA: FAIL ..." lines. Static build:
 *   aarch64-linux-gnu-gcc -O2 -static -o edu-dma edu-dma-arm64.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define EDU_BUF 0x40000u
#define COUNT 2048u
static volatile uint8_t *bar;

static uint64_t rd64(unsigned off) { return *(volatile uint64_t *)(bar + off); }
static void wr64(unsigned off, uint64_t v) { *(volatile uint64_t *)(bar + off) = v; }
static uint32_t rd32(unsigned off) { return *(volatile uint32_t *)(bar + off); }

static int dma(uint64_t src, uint64_t dst, int to_ram)
{
    wr64(0x80, src); wr64(0x88, dst); wr64(0x90, COUNT);
    wr64(0x98, 1 | (to_ram ? 2 : 0));
    for (int i = 0; i < 300; i++) {           /* each DMA: ~100 ms virtual */
        if (!(rd64(0x98) & 1)) return 0;
        usleep(10000);
    }
    return -1;
}

static uint64_t bus_addr(void *p)
{
    uint64_t e = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0) return 0;
    pread(fd, &e, 8, ((uintptr_t)p / 4096) * 8);
    close(fd);
    if (!(e & (1ULL << 63))) return 0;
    return (e & ((1ULL << 55) - 1)) * 4096;
}

int main(void)
{
    char path[600], dev[256] = "";
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *de;
    while (d && (de = readdir(d))) {
        unsigned v = 0, id = 0;
        FILE *f;
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vendor", de->d_name);
        if (!(f = fopen(path, "r"))) continue;
        fscanf(f, "%x", &v); fclose(f);
        snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/device", de->d_name);
        if (!(f = fopen(path, "r"))) continue;
        fscanf(f, "%x", &id); fclose(f);
        if (v == 0x1234 && id == 0x11e8) snprintf(dev, sizeof dev, "%s", de->d_name);
    }
    if (!dev[0]) { printf("EDU-DMA: FAIL no edu device\n"); return 1; }

    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/config", dev);
    int cfd = open(path, O_RDWR);
    uint16_t cmd = 0;
    pread(cfd, &cmd, 2, 4);
    cmd |= 0x6;                                   /* memory space, bus master */
    pwrite(cfd, &cmd, 2, 4);
    close(cfd);
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/resource0", dev);
    int rfd = open(path, O_RDWR | O_SYNC);
    bar = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, rfd, 0);
    if (bar == MAP_FAILED) { printf("EDU-DMA: FAIL mmap %s\n", path); return 1; }
    printf("EDU-DMA: edu %s ident 0x%08x\n", dev, rd32(0));

    uint8_t *a = mmap(NULL, 8192, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
    uint8_t *b = a + 4096;
    for (unsigned i = 0; i < 4096; i++) { a[i] = (uint8_t)(i * 7 + 0x5a); b[i] = 0; }
    uint64_t ba = bus_addr(a), bb = bus_addr(b);
    printf("EDU-DMA: page A bus 0x%llx, page B bus 0x%llx\n",
           (unsigned long long)ba, (unsigned long long)bb);
    if (!ba || !bb) { printf("EDU-DMA: FAIL no pagemap frame\n"); return 1; }

    int fails = 0;
    /* A -> edu -> B: both directions through the SMMU */
    if (dma(ba, EDU_BUF, 0) || dma(EDU_BUF, bb, 1)) { printf("EDU-DMA: FAIL timeout\n"); return 1; }
    if (memcmp(a, b, COUNT) == 0)
        printf("EDU-DMA: PASS dom0 page -> edu -> dom0 page, %u bytes equal\n", COUNT);
    else {
        printf("EDU-DMA: FAIL copy differs (B[0..3] = %02x %02x %02x %02x, A[0..3] = %02x %02x %02x %02x)\n",
               b[0], b[1], b[2], b[3], a[0], a[1], a[2], a[3]);
        fails++;
    }

    /* a bus address outside dom0's RAM: must not arrive in B */
    memset(b, 0xee, 4096);
    uint64_t outside = strtoull(getenv("EDU_OUTSIDE") ? getenv("EDU_OUTSIDE") : "0xb0000000", NULL, 0);
    if (dma(outside, EDU_BUF, 0) || dma(EDU_BUF, bb, 1)) { printf("EDU-DMA: FAIL timeout\n"); return 1; }
    int zeros = 1;
    for (unsigned i = 0; i < COUNT; i++) if (b[i]) { zeros = 0; break; }
    printf("EDU-DMA: INFO DMA read of 0x%llx: B[0..3] after edu -> B = %02x %02x %02x %02x (%s)\n",
           (unsigned long long)outside, b[0], b[1], b[2], b[3],
           zeros ? "all zero" : memcmp(a, b, COUNT) == 0 ? "stale edu buffer (A's bytes)" : "other bytes");
    printf("EDU-DMA: done, %d failed\n", fails);
    return fails != 0;
}
