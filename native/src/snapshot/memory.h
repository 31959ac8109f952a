// Guest RAM to and from a sparse file. The file has the layout of the RAM
// memfd: region i at the sum of the sizes before it, so restore maps each
// region at its offset (GuestMemory::PrivateFile).
//
// Only pages that hold non-zero bytes are written (holes elsewhere). The
// never-touched parts are skipped without reading them: for anonymous RAM (a
// booted VM's) the pages /proc/self/pagemap shows neither present nor swapped,
// for memfd RAM the extents SEEK_DATA/SEEK_HOLE show as holes; within the
// touched ones zero pages are skipped too. A restored VM's RAM (a private file
// mapping) has no such map, so every page is looked at. The file is the same
// whichever kind of RAM it came from.
#pragma once
#include <cstdint>
#include <string>

#include "core/guest_memory.h"

namespace vmlet::snapshot {

struct MemoryFileInfo {
  uint64_t logical_bytes = 0;    // = RAM size
  uint64_t data_bytes = 0;       // non-zero pages written
  uint64_t allocated_bytes = 0;  // st_blocks * 512 after writing
  uint32_t crc = 0;              // CRC32C over (offset, page) of every non-zero page
};

// Creates `path` (must not exist), writes and fsyncs it.
MemoryFileInfo WriteMemoryFile(const GuestMemory& mem, const std::string& path);
// Reads every data extent of `path` and recomputes the CRC (slow: the whole file).
uint32_t MemoryFileCrc(const std::string& path);

// CRC32C with the SSE4.2 instruction when the CPU has it.
uint32_t Crc32cFast(const void* data, size_t len, uint32_t crc);

}  // namespace vmlet::snapshot
