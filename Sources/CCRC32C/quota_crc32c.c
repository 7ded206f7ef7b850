// CRC-32C with the CPU's own instructions, for the journal's record checksums (issue 13: the table-driven
// Swift version was ~2 % of a claim's instructions in `durability: journal`). The Swift caller keeps its
// table version for CPUs without them.
#include "quota_crc32c.h"

#include <string.h>

#if defined(__x86_64__)

int quota_crc32c_hardware(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
}

__attribute__((target("sse4.2")))
uint32_t quota_crc32c_update_hw(uint32_t crc, const void *data, size_t len) {
    const unsigned char *p = (const unsigned char *)data;
    uint64_t c = crc;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (len > 0) {
        c32 = __builtin_ia32_crc32qi(c32, *p);
        p++;
        len--;
    }
    return c32;
}

#elif defined(__aarch64__)

#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif

int quota_crc32c_hardware(void) {
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) ? 1 : 0;
}

__attribute__((target("+crc")))
uint32_t quota_crc32c_update_hw(uint32_t crc, const void *data, size_t len) {
    const unsigned char *p = (const unsigned char *)data;
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = __crc32cd(crc, v);
        p += 8;
        len -= 8;
    }
    while (len > 0) {
        crc = __crc32cb(crc, *p);
        p++;
        len--;
    }
    return crc;
}

#else

int quota_crc32c_hardware(void) { return 0; }

uint32_t quota_crc32c_update_hw(uint32_t crc, const void *data, size_t len) {
    (void)data;
    (void)len;
    return crc;
}

#endif
