// The identity of a file a VM was booted from (kept apart from snapshot.h so
// kvm/machine.h can hold one without the whole snapshot interface).
#pragma once
#include <cstdint>
#include <string>

namespace vmlet::snapshot {

// Which kernel/initrd a snapshot's memory came from: recorded at VM creation
// (a stat, cheap) and hashed when the snapshot is taken, so a file replaced
// in between is caught.
struct FileIdentity {
  std::string path;
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  std::string sha256;  // hex; empty until the snapshot hashes it
  static FileIdentity Stat(const std::string& path);
};

}  // namespace vmlet::snapshot
