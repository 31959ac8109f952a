// Typed errors for the native side. Every error names the operation that
// failed and, where the kernel said why, the errno: a log line must tell what
// broke without a debugger (the Cloud Hypervisor habit).
#pragma once
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace vmlet {

// Which room an error comes from; the TS facade maps it to a typed error class.
enum class ErrorKind {
  Kvm,          // /dev/kvm missing, not permitted, an ioctl refused
  Memory,       // guest RAM could not be created or mapped
  Boot,         // kernel/guest image missing or not bootable
  Device,       // a device could not be set up (backing file, socket)
  Guest,        // the guest itself failed (triple fault, emulation failure)
  Image,        // a layer/image could not be converted
  Snapshot,     // a snapshot is corrupt, truncated, of another version, CPU or config
  InvalidArgument,
};

class VmmError : public std::runtime_error {
 public:
  VmmError(ErrorKind kind, std::string op, std::string detail, int err = 0)
      : std::runtime_error(Format(op, detail, err)), kind_(kind), op_(std::move(op)), errno_(err) {}

  ErrorKind kind() const { return kind_; }
  const std::string& op() const { return op_; }
  int error_number() const { return errno_; }

 private:
  static std::string Format(const std::string& op, const std::string& detail, int err) {
    std::string s = op;
    if (!detail.empty()) s += ": " + detail;
    if (err != 0) s += std::string(" (") + std::strerror(err) + ", errno " + std::to_string(err) + ")";
    return s;
  }
  ErrorKind kind_;
  std::string op_;
  int errno_;
};

// For a failed system call: captures errno at the call site.
inline VmmError SysError(ErrorKind kind, std::string op, std::string detail = {}) {
  int e = errno;
  return VmmError(kind, std::move(op), std::move(detail), e);
}

inline const char* ErrorKindName(ErrorKind k) {
  switch (k) {
    case ErrorKind::Kvm: return "KvmError";
    case ErrorKind::Memory: return "GuestMemoryError";
    case ErrorKind::Boot: return "BootError";
    case ErrorKind::Device: return "DeviceError";
    case ErrorKind::Guest: return "GuestError";
    case ErrorKind::Image: return "ImageError";
    case ErrorKind::Snapshot: return "SnapshotError";
    case ErrorKind::InvalidArgument: return "InvalidArgumentError";
  }
  return "VmmError";
}

}  // namespace vmlet
