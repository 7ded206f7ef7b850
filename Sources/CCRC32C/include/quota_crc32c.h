#ifndef QUOTA_CRC32C_H
#define QUOTA_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/// 1 when this CPU has CRC-32C instructions (x86-64 SSE 4.2, ARMv8 CRC), else 0.
int quota_crc32c_hardware(void);

/// CRC-32C (Castagnoli) of `len` bytes at `data`, continuing from `crc` (no pre- or post-inversion),
/// with the CPU's instructions. Call only when quota_crc32c_hardware() is 1.
uint32_t quota_crc32c_update_hw(uint32_t crc, const void *data, size_t len);

#endif
