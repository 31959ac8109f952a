// One microVM: guest RAM, the KVM VM and its vCPU threads, the buses and the
// devices on them. Lifecycle: construct (everything allocated, kernel
// loaded, nothing running) -> Start -> [Pause/Resume]* -> stop (a terminal
// exit or RequestStop) -> Teardown (threads joined, devices shut down, every
// fd closed, RAM unmapped). Teardown is explicit and idempotent; the
// destructor only backs it up.
//
// Threads: each vCPU runs KVM_RUN on its own std::thread. A vCPU is kicked
// out of KVM_RUN by a signal whose handler sets kvm_run->immediate_exit, so a
// kick that lands just before KVM_RUN is not lost.
#pragma once
#include <linux/kvm.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "boot/loader.h"
#include "core/bus.h"
#include "core/guest_memory.h"
#include "kvm/kvm.h"
#include "snapshot/identity.h"

namespace vmlet::virtio {
class VirtioDevice;
}
namespace vmlet::devices {
class Serial;
class Rtc;
}
namespace vmlet {
class MmioTransport;
}
namespace vmlet::snapshot {
struct Image;
struct Summary;
}

namespace vmlet::kvm {

class KvmStats;

struct DiskSpec {
  std::string path;
  bool read_only = false;
  std::string id;
  // A read-only disk slot with no medium (no path): capacity 0 until a
  // restore gives it a file (see devices/blk.h).
  bool empty = false;
};
struct VsockSpec {
  uint64_t guest_cid = 0;
  std::string uds_path;
};

struct MachineConfig {
  std::string kvm_device;  // empty: DefaultDevicePath()
  boot::BootSpec boot;
  uint64_t memory_bytes = 0;
  uint32_t cpus = 1;
  std::string serial_log;
  std::vector<DiskSpec> disks;
  std::optional<VsockSpec> vsock;
  // Hide KVM paravirt features (CPUID 0x40000001) from a guest that must not
  // use hypercalls or kvmclock.
  bool mask_kvm_paravirt = false;
  // Restores only: RAM ranges read from other files (core/guest_memory.h Overlay).
  std::vector<GuestMemory::Overlay> memory_overlays;
};

struct VmExit {
  enum class Reason { GuestExit, Reset, Shutdown, EmulationFailure, Killed, Error };
  Reason reason = Reason::Error;
  uint32_t code = 0;
  std::string message;
  uint64_t rip = 0;
  std::vector<uint8_t> instruction;
};
const char* ReasonName(VmExit::Reason r);

struct MachineStats {
  std::vector<std::pair<std::string, uint64_t>> exits;  // by reason name, nonzero only
  uint64_t created_ns = 0;      // CLOCK_MONOTONIC when construction began
  uint64_t first_entry_ns = 0;  // CLOCK_MONOTONIC of the first KVM_RUN; 0 before it
  uint64_t restored_ns = 0;     // CLOCK_MONOTONIC when a restore began; 0 for a booted VM
  uint64_t boot_load_ns = 0;    // booted VMs: how long kernel + initrd took to reach guest RAM
  bool from_shell = false;      // made on a pre-made VM from the reserve (kvm/vm_shell.h)
  uint64_t overlay_bytes = 0;   // restored VMs: RAM mapped from memory overlays
};

class Machine {
 public:
  // Throws VmmError (Kvm, Memory, Boot, Device, InvalidArgument); on throw
  // everything already allocated is released.
  explicit Machine(const MachineConfig& config);
  // Restore (snapshot/machine_snapshot.cc): `config` comes from
  // snapshot::RestoreConfig; RAM is the image's memory file mapped
  // copy-on-write, vCPU/VM/device state the image's. Nothing runs until
  // Start. Throws VmmError (Snapshot for state this host or these devices
  // cannot take); on throw everything is released.
  Machine(const MachineConfig& config, const snapshot::Image& image, uint64_t restore_began_ns);
  ~Machine();
  Machine(const Machine&) = delete;
  Machine& operator=(const Machine&) = delete;

  // on_stopped runs exactly once, on the last vCPU thread to leave its loop,
  // with the exit that stopped the VM. It must not call Teardown (which joins
  // that very thread); hand off to another thread instead.
  void Start(std::function<void(const VmExit&)> on_stopped);
  // Pausing is split so that the request takes effect in call order (a
  // Resume issued right after a pause request cancels it) while the wait for
  // the vCPUs to park can happen on another thread.
  // RequestPause: non-blocking; returns the pause generation to wait on.
  uint64_t RequestPause();
  // Blocks until every vCPU is parked outside KVM_RUN, the VM stopped, or a
  // Resume ended that pause generation.
  void WaitPaused(uint64_t generation);
  void Pause() { WaitPaused(RequestPause()); }
  void Resume();
  // Non-blocking. The first stop reason recorded wins.
  void RequestStop(VmExit why);
  // Blocking and idempotent: stops the VM if still running, joins, frees.
  VmExit Teardown();

  // The VM must be paused (every vCPU parked): writes dir/ (created, or
  // existing and empty). Throws VmmError(InvalidArgument) when not paused,
  // (Snapshot) when the directory or the state cannot be written.
  snapshot::Summary Snapshot(const std::string& dir);
  bool paused() const;
  // Whether the restore delivered VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (false
  // for a booted VM, or when the guest's vsock driver was not live).
  bool vsock_reset_sent() const { return vsock_reset_sent_; }

  // Fills empty disk slot `index` (the index in MachineConfig::disks) with
  // `path`, read-only, while the VM may run (devices/blk.h BlkAttachMedium).
  void AttachDisk(uint32_t index, const std::string& path);

  MachineStats Stats() const;
  // KVM's own counters for this VM (kvm/stats.h): live while it runs, the last
  // values after it stopped. Throws VmmError(Kvm) on a KVM without them.
  std::map<std::string, uint64_t> KvmStatistics() const;
  bool started() const { return started_; }
  // The kernel command line as the guest sees it (virtio_mmio.device=... appended).
  const std::string& cmdline() const { return cmdline_; }
  const boot::BootPlan& boot_plan() const { return plan_; }

 private:
  struct Vcpu {
    uint32_t index = 0;
    int fd = -1;
    kvm_run* run = nullptr;
  };

  void Build(const MachineConfig& config, const snapshot::Image* image = nullptr);
  void RestoreState(const snapshot::Image& image);
  void CreateVcpu(uint32_t index);
  void SetupCpuid(Vcpu& v);
  void SetupMsrs(Vcpu& v);
  void SetupLapic(Vcpu& v);
  void SetupBootRegisters(Vcpu& v);
  void RunVcpu(Vcpu& v);
  bool HandleExit(Vcpu& v);  // false: this vCPU stops
  void EmulationFailure(Vcpu& v);
  void Kick();
  void ReleaseResources();

  uint64_t created_ns_ = 0;
  uint64_t boot_load_ns_ = 0;
  std::atomic<uint64_t> first_entry_ns_{0};
  std::unique_ptr<Kvm> kvm_;
  int vm_fd_ = -1;
  std::unique_ptr<GuestMemory> mem_;
  Bus pio_;
  Bus mmio_;
  std::shared_ptr<devices::Serial> serial_;
  std::vector<std::shared_ptr<virtio::VirtioDevice>> virtio_devices_;
  std::vector<Vcpu> vcpus_;
  std::vector<std::thread> threads_;
  uint32_t cpus_ = 1;
  bool mask_kvm_paravirt_ = false;
  boot::BootPlan plan_;
  std::string cmdline_;

  // What a snapshot records of how this VM was made.
  std::vector<std::shared_ptr<MmioTransport>> transports_;  // by virtio-mmio slot
  std::shared_ptr<devices::Rtc> rtc_;
  MachineConfig config_;
  snapshot::FileIdentity kernel_id_;
  snapshot::FileIdentity initrd_id_;  // path empty: no initrd
  uint64_t restored_ns_ = 0;
  bool vsock_reset_sent_ = false;
  bool from_shell_ = false;
  uint64_t overlay_bytes_ = 0;

  // Run state, guarded by mu_.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool started_ = false;
  bool stopping_ = false;
  bool pause_requested_ = false;
  uint64_t pause_generation_ = 0;  // bumped by every Resume
  bool torn_down_ = false;
  bool snapshotting_ = false;  // Snapshot() is reading state: vCPUs stay parked, Teardown waits
  uint32_t parked_ = 0;
  uint32_t running_threads_ = 0;
  std::vector<pthread_t> live_threads_;  // vCPU threads that may be in KVM_RUN
  std::optional<VmExit> exit_;
  std::function<void(const VmExit&)> on_stopped_;

  std::array<std::atomic<uint64_t>, 64> exit_counts_{};
  std::atomic<uint64_t> unclaimed_io_{0};
  std::atomic<uint64_t> unclaimed_mmio_{0};
  std::atomic<uint64_t> interrupted_{0};
  std::atomic<bool> mmio_logged_{false};
  std::unique_ptr<KvmStats> kvm_stats_;
};

}  // namespace vmlet::kvm
