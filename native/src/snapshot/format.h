// The snapshot state file: a 32-byte header, a section table, then the
// sections, each with its own CRC32C. The guest memory lives beside it in a
// sparse file (memory.h); this file records how to read it back.
//
//   0  magic "VMLETSNP"      16  file_bytes u64 (the whole file)
//   8  version u32           24  table_crc u32 (CRC32C of the table)
//  12  section_count u32     28  header_crc u32 (CRC32C of bytes 0..27)
//  32  table: section_count x { id u32, crc u32, offset u64, length u64 }
//      then the sections, back to back in table order.
//
// Checked in this order, so each failure gets the clearest reason: size,
// magic, version (a newer or older vmlet's file is refused before its
// checksums are trusted to mean anything), header CRC, length, table, each
// section. Any failure is VmmError(Snapshot).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace vmlet::snapshot {

inline constexpr char kMagic[8] = {'V', 'M', 'L', 'E', 'T', 'S', 'N', 'P'};
// Bump on any change of a section's encoding: old files are then refused.
inline constexpr uint32_t kFormatVersion = 1;
inline constexpr size_t kHeaderBytes = 32;
inline constexpr size_t kTableEntryBytes = 24;
inline constexpr uint32_t kMaxSections = 1024;

enum SectionId : uint32_t {
  kSectionConfig = 1,   // what was booted and how: memory, cpus, devices, kernel identity
  kSectionHost = 2,     // the CPU/KVM the state is only valid on
  kSectionVm = 3,       // irqchips, PIT, KVM clock
  kSectionSerial = 4,
  kSectionRtc = 5,
  kSectionVcpu = 0x100,    // + vCPU index
  kSectionDevice = 0x400,  // + virtio-mmio slot
};

struct Section {
  uint32_t id = 0;
  std::vector<uint8_t> data;
};

std::vector<uint8_t> EncodeStateFile(const std::vector<Section>& sections);
// `what` names the file in errors.
std::vector<Section> DecodeStateFile(const uint8_t* p, size_t n, const std::string& what);

// Written to a temporary name, fsynced and renamed, so a crash never leaves a
// state file that looks whole.
void WriteStateFile(const std::string& path, const std::vector<Section>& sections);
std::vector<Section> ReadStateFile(const std::string& path);

const Section* FindSection(const std::vector<Section>& s, uint32_t id);

}  // namespace vmlet::snapshot
