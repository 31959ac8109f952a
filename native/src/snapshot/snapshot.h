// VM snapshots: what a snapshot directory holds, taking one from a paused
// Machine, and making a new Machine from one.
//
//   <dir>/state   the state file (format.h): config, host fingerprint, VM,
//                 vCPU and device sections
//   <dir>/memory  guest RAM, sparse (memory.h)
//
// The state file is written last (temp + fsync + rename): a directory
// without it is an interrupted snapshot and is refused.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kvm/machine.h"
#include "snapshot/cpu_state.h"
#include "snapshot/format.h"
#include "snapshot/identity.h"

namespace vmlet::snapshot {

inline constexpr const char* kStateFile = "state";
inline constexpr const char* kMemoryFile = "memory";

// The config section: everything a restore must reproduce to the letter.
struct SnapshotConfig {
  uint64_t memory_bytes = 0;
  uint32_t cpus = 0;
  bool mask_kvm_paravirt = false;
  std::string boot_cmdline;  // as given at creation
  std::string cmdline;       // as the guest saw it (virtio_mmio entries appended)
  FileIdentity kernel;
  std::optional<FileIdentity> initrd;
  struct Disk {
    bool read_only = false;
    std::string id;
  };
  std::vector<Disk> disks;
  bool has_vsock = false;
  uint64_t vsock_cid = 0;
  struct Region {
    uint64_t gpa, size, file_offset;
  };
  std::vector<Region> regions;
  uint64_t memory_file_bytes = 0;  // logical size
  uint64_t memory_data_bytes = 0;  // non-zero pages
  uint32_t memory_crc = 0;

  void Encode(Writer& w) const;
  static SnapshotConfig Decode(Reader& r);
};

// The host section: a snapshot's CPU state is only valid on a CPU and KVM
// that offer the same CPUID and save areas.
struct HostFingerprint {
  std::string cpuid_sha256;  // of KVM_GET_SUPPORTED_CPUID, as this vmlet reads it
  std::string vendor;        // CPUID leaf 0 vendor string, for the error message
  uint32_t family_model = 0; // CPUID leaf 1 EAX, for the error message
  uint32_t xsave_bytes = 0;
  bool xcrs = false, debugregs = false;

  static HostFingerprint Of(const kvm::Kvm& kvm, const CpuCaps& caps);
  // Throws VmmError(Snapshot) saying what differs.
  void CheckSame(const HostFingerprint& here) const;
  void Encode(Writer& w) const;
  static HostFingerprint Decode(Reader& r);
};

// A snapshot directory, read and checked (container, config, fingerprint
// encoding); the per-vCPU and device sections are decoded during restore.
struct Image {
  std::string dir;
  std::string memory_path;
  uint32_t version = 0;
  SnapshotConfig config;
  HostFingerprint host;
  VmState vm;
  std::vector<VcpuState> vcpus;
  std::vector<uint8_t> serial, rtc;
  std::vector<std::vector<uint8_t>> devices;  // by virtio-mmio slot
  uint64_t memory_allocated_bytes = 0;

  // Throws VmmError(Snapshot) for a missing, truncated or corrupt snapshot.
  static Image Load(const std::string& dir);
  static Image FromSections(const std::vector<Section>& sections, const std::string& dir);
};

struct Summary {
  std::string dir;
  uint32_t version = kFormatVersion;
  uint64_t memory_bytes = 0;
  uint64_t memory_file_bytes = 0;  // allocated on disk
  uint64_t memory_data_bytes = 0;
  uint32_t cpus = 0;
  std::string kernel_sha256;
  std::vector<uint32_t> refused_msrs;  // KVM listed them but would not read them
  std::vector<std::string> skipped;    // state this KVM cannot save at all
  uint64_t duration_ns = 0;
};

struct RestoreOptions {
  std::string dir;
  std::string serial_log;
  std::vector<kvm::DiskSpec> disks;
  std::optional<kvm::VsockSpec> vsock;
  std::string kvm_device;
  // Re-read the whole memory file and check its CRC before mapping it
  // (slow: reads every page; off by default, restore maps without reading).
  bool verify_memory = false;
  // When set, the snapshot must have been booted from these (SHA-256 hex):
  // a template cached for another kernel or initrd (agent) is refused.
  std::string expect_kernel_sha256;
  std::string expect_initrd_sha256;
  // RAM ranges mapped from other files holding the same bytes (core/guest_memory.h).
  std::vector<GuestMemory::Overlay> memory_overlays;
};

// The machine config a restore builds: the snapshot's, with the new
// sandbox's disks, vsock and serial. Throws VmmError(Snapshot) when the
// given disks/vsock do not match the snapshot's devices.
kvm::MachineConfig RestoreConfig(const Image& image, const RestoreOptions& o);

// Reads, checks and restores: a paused-equivalent Machine (Start runs it).
std::unique_ptr<kvm::Machine> Restore(const RestoreOptions& o);

}  // namespace vmlet::snapshot
