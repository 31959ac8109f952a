#include "kvm/machine.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "boot/layout.h"
#include "boot/mptable.h"
#include "core/error.h"
#include "devices/debug_exit.h"
#include "devices/i8042.h"
#include "devices/rtc.h"
#include "devices/serial.h"
#include "virtio/device.h"
#include "kvm/stats.h"
#include "kvm/vm_shell.h"

#include "devices/blk.h"
#include "devices/vsock.h"
#include "snapshot/snapshot.h"
#include "virtio/mmio.h"

namespace vmlet::kvm {

namespace {

uint64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);  // the clock behind process.hrtime
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

// A booted VM's RAM is anonymous (huge pages under the host's default THP
// setting, core/guest_memory.h). VMLET_GUEST_RAM=memfd puts it in a memfd as
// before, to measure the two against each other (hack/bench/boot.bench.ts);
// any other value is refused rather than silently ignored.
RamBacking BootRamBacking() {
  const char* v = getenv("VMLET_GUEST_RAM");
  if (!v || !*v || std::string(v) == "anonymous") return RamBacking::Anonymous;
  if (std::string(v) == "memfd") return RamBacking::Memfd;
  throw VmmError(ErrorKind::InvalidArgument, "choose guest RAM backing",
                 std::string("VMLET_GUEST_RAM is '") + v + "'; set it to 'anonymous' (the default) or 'memfd', or unset it");
}

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// The kick: its handler only flips immediate_exit of the vCPU running on this
// thread, which is async-signal-safe. t_run is set before the thread can be
// signalled, so the TLS slot already exists when the handler reads it.
thread_local kvm_run* t_run = nullptr;

void KickHandler(int) {
  kvm_run* r = t_run;
  if (r) r->immediate_exit = 1;
}

int KickSignal() {
  static int sig = [] {
    int s = SIGRTMIN + 3;
    struct sigaction sa {};
    sa.sa_handler = KickHandler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must come back with EINTR
    sigaction(s, &sa, nullptr);
    return s;
  }();
  return sig;
}

const char* ExitName(uint32_t reason) {
  static const char* const names[] = {
      "unknown", "exception", "io", "hypercall", "debug", "hlt", "mmio", "irq-window-open", "shutdown",
      "fail-entry", "intr", "set-tpr", "tpr-access", "s390-sieic", "s390-reset", "dcr", "nmi",
      "internal-error", "osi", "papr-hcall", "s390-ucontrol", "watchdog", "s390-tsch", "epr",
      "system-event", "s390-stsi", "ioapic-eoi", "hyperv", "arm-nisv", "x86-rdmsr", "x86-wrmsr",
      "dirty-ring-full", "ap-reset-hold", "x86-bus-lock", "xen", "riscv-sbi", "riscv-csr", "notify"};
  return reason < sizeof names / sizeof names[0] ? names[reason] : nullptr;
}

// Legacy POST-code port: firmware-style progress codes, deliberately dropped.
class PostCodePort : public BusDevice {
 public:
  void Read(uint64_t, uint8_t* data, uint32_t len) override { std::memset(data, 0xff, len); }
  void Write(uint64_t, const uint8_t*, uint32_t) override {}
};

kvm_segment SegmentFromGdt(uint64_t e, uint16_t selector) {
  kvm_segment s{};
  s.base = static_cast<uint64_t>(((e >> 16) & 0xffffff) | (((e >> 56) & 0xff) << 24));
  uint32_t limit = static_cast<uint32_t>((e & 0xffff) | ((e >> 32) & 0xf0000));
  s.g = (e >> 55) & 1;
  s.limit = s.g ? (limit << 12) | 0xfff : limit;
  s.selector = selector;
  s.type = (e >> 40) & 0xf;
  s.s = (e >> 44) & 1;
  s.dpl = (e >> 45) & 3;
  s.present = (e >> 47) & 1;
  s.avl = (e >> 52) & 1;
  s.l = (e >> 53) & 1;
  s.db = (e >> 54) & 1;
  s.unusable = s.present ? 0 : 1;
  return s;
}

// MSRs every vCPU starts from (Firecracker's boot set); anything the host does
// not list in KVM_GET_MSR_INDEX_LIST is left out rather than forced.
struct BootMsr {
  uint32_t index;
  uint64_t value;
};
constexpr BootMsr kBootMsrs[] = {
    {0x174, 0},                 // IA32_SYSENTER_CS
    {0x175, 0},                 // IA32_SYSENTER_ESP
    {0x176, 0},                 // IA32_SYSENTER_EIP
    {0xc0000081, 0},            // STAR
    {0xc0000082, 0},            // LSTAR
    {0xc0000083, 0},            // CSTAR
    {0xc0000084, 0},            // SYSCALL_MASK
    {0xc0000102, 0},            // KERNEL_GS_BASE
    {0x10, 0},                  // IA32_TSC
    {0x1a0, 1},                 // IA32_MISC_ENABLE: fast strings
    {0x2ff, (1u << 11) | 6},    // MTRRdefType: MTRRs on, default write-back
};

}  // namespace

const char* ReasonName(VmExit::Reason r) {
  switch (r) {
    case VmExit::Reason::GuestExit: return "guest-exit";
    case VmExit::Reason::Reset: return "reset";
    case VmExit::Reason::Shutdown: return "shutdown";
    case VmExit::Reason::EmulationFailure: return "emulation-failure";
    case VmExit::Reason::Killed: return "killed";
    case VmExit::Reason::Error: return "error";
  }
  return "error";
}

Machine::Machine(const MachineConfig& config) {
  created_ns_ = NowNs();
  try {
    Build(config);
  } catch (...) {
    ReleaseResources();
    throw;
  }
}

Machine::~Machine() {
  try {
    Teardown();
  } catch (...) {
  }
}

void Machine::Build(const MachineConfig& config, const snapshot::Image* image) {
  // 254: APIC ids are 8 bits, 0xff is broadcast, and the IOAPIC takes one.
  if (config.cpus < 1 || config.cpus > 254)
    throw VmmError(ErrorKind::InvalidArgument, "create VM", "cpus is " + std::to_string(config.cpus) + ": use 1..254");
  if (config.memory_bytes < (2u << 20) || config.memory_bytes % 4096)
    throw VmmError(ErrorKind::InvalidArgument, "create VM",
                   "memory of " + std::to_string(config.memory_bytes) + " bytes: use at least 2 MiB, in whole pages");
  const RamBacking backing = BootRamBacking();
  cpus_ = config.cpus;
  mask_kvm_paravirt_ = config.mask_kvm_paravirt;
  config_ = config;
  // Stat only (cheap); the snapshot hashes and compares it against this.
  if (!image) {
    kernel_id_ = snapshot::FileIdentity::Stat(config.boot.kernel);
    if (!config.boot.initrd.empty()) initrd_id_ = snapshot::FileIdentity::Stat(config.boot.initrd);
  }

  // A shell from the reserve (kvm/vm_shell.h) when one is held for this
  // device: its KVM_CREATE_VM already happened off this path.
  const std::string device = config.kvm_device.empty() ? DefaultDevicePath() : config.kvm_device;
  if (std::optional<VmShell> shell = VmShellReserve::Get().Take(device)) {
    kvm_ = std::move(shell->kvm);
    vm_fd_ = shell->Release();
    from_shell_ = true;
  } else {
    kvm_ = std::make_unique<Kvm>(device);
  }
  int max_vcpus = kvm_->CheckExtension(KVM_CAP_MAX_VCPUS);
  if (max_vcpus > 0 && config.cpus > static_cast<uint32_t>(max_vcpus))
    throw VmmError(ErrorKind::InvalidArgument, "create VM",
                   "cpus is " + std::to_string(config.cpus) + " but this KVM allows " + std::to_string(max_vcpus));
  if (!from_shell_) vm_fd_ = CreateVmFd(*kvm_);
  // RAM before the interrupt controllers, on purpose: on the dev hosts' KVM a
  // memslot added once the in-kernel irqchip and PIT exist took ~7 ms (the
  // memslot update's grace-period wait, most likely), 0.03 ms before them:
  // most of a VM's start and restore time. Firecracker orders it the same way.
  // (The KVM lab hangs once blamed on this order came from multi-threaded TCG.)
  if (image) mem_ = std::make_unique<GuestMemory>(boot::RamLayout(config.memory_bytes), GuestMemory::PrivateFile{image->memory_path, config.memory_overlays});
  else mem_ = std::make_unique<GuestMemory>(boot::RamLayout(config.memory_bytes), backing);
  overlay_bytes_ = mem_->overlay_bytes();  // kept for Stats after teardown frees mem_
  uint32_t slot = 0;
  for (auto& r : mem_->regions()) {
    kvm_userspace_memory_region region{};
    region.slot = slot++;
    region.guest_phys_addr = r.gpa;
    region.memory_size = r.size;
    region.userspace_addr = reinterpret_cast<uint64_t>(r.host);
    if (ioctl(vm_fd_, KVM_SET_USER_MEMORY_REGION, &region) != 0)
      throw SysError(ErrorKind::Kvm, "KVM_SET_USER_MEMORY_REGION", "slot " + std::to_string(region.slot) + " at " + Hex(r.gpa));
  }
  if (ioctl(vm_fd_, KVM_CREATE_IRQCHIP, 0) != 0) throw SysError(ErrorKind::Kvm, "KVM_CREATE_IRQCHIP");
  kvm_pit_config pit{};
  pit.flags = KVM_PIT_SPEAKER_DUMMY;
  if (ioctl(vm_fd_, KVM_CREATE_PIT2, &pit) != 0) throw SysError(ErrorKind::Kvm, "KVM_CREATE_PIT2");

  // Legacy devices on the port bus.
  serial_ = std::make_shared<devices::Serial>(config.serial_log, std::make_shared<IrqIoctlLine>(vm_fd_, devices::Serial::kIrq));
  pio_.Insert(devices::Serial::kBase, devices::Serial::kSize, serial_);
  pio_.Insert(devices::DebugExit::kBase, devices::DebugExit::kSize, std::make_shared<devices::DebugExit>([this](uint32_t code) {
                VmExit e;
                e.reason = VmExit::Reason::GuestExit;
                e.code = code;
                RequestStop(std::move(e));
              }));
  pio_.Insert(devices::I8042::kBase, devices::I8042::kSize, std::make_shared<devices::I8042>([this] {
                VmExit e;
                e.reason = VmExit::Reason::Reset;
                e.message = "guest reset the CPU through the i8042 controller";
                RequestStop(std::move(e));
              }));
  pio_.Insert(0x80, 1, std::make_shared<PostCodePort>());
  rtc_ = std::make_shared<devices::Rtc>();
  pio_.Insert(devices::Rtc::kBase, devices::Rtc::kSize, rtc_);

  // virtio-mmio devices: disks, then vsock; window i at base + i*4K on GSI 5+i.
  cmdline_ = config.boot.cmdline;
  uint32_t slot_index = 0;
  bool ioeventfd = kvm_->CheckExtension(KVM_CAP_IOEVENTFD) > 0;
  auto add_virtio = [&](std::shared_ptr<virtio::VirtioDevice> dev) {
    uint64_t base = boot::kVirtioMmioBase + slot_index * boot::kVirtioMmioStride;
    uint32_t gsi = boot::kVirtioFirstGsi + slot_index;
    // KVM's default routing reaches IOAPIC pins 0..23 only: a GSI beyond
    // would take a line whose interrupts go nowhere.
    if (gsi >= boot::kIoapicPins)
      throw VmmError(ErrorKind::InvalidArgument, "create VM",
                     "more than " + std::to_string(boot::kIoapicPins - boot::kVirtioFirstGsi) +
                         " virtio devices: GSIs 5..23 are all taken; use fewer disks");
    std::shared_ptr<IoEventBinder> binder;
    if (ioeventfd) binder = std::make_shared<IoEventFdBinder>(vm_fd_, base);
    auto transport = std::make_shared<MmioTransport>(dev, mem_.get(), std::make_shared<IrqIoctlLine>(vm_fd_, gsi), binder);
    if (!mmio_.Insert(base, MmioTransport::kWindowSize, transport))
      throw VmmError(ErrorKind::Device, "insert virtio-mmio device", "window " + Hex(base) + " overlaps another");
    virtio_devices_.push_back(std::move(dev));
    transports_.push_back(transport);
    char entry[64];
    snprintf(entry, sizeof entry, "virtio_mmio.device=4K@0x%llx:%u", static_cast<unsigned long long>(base), gsi);
    if (!cmdline_.empty()) cmdline_ += ' ';
    cmdline_ += entry;
    slot_index++;
  };
  for (auto& d : config.disks) {
    BlkConfig bc;
    bc.path = d.path;
    bc.read_only = d.read_only;
    bc.id = d.id;
    bc.empty = d.empty;
    add_virtio(MakeVirtioBlk(bc));
  }
  if (config.vsock) {
    VsockConfig vc;
    vc.guest_cid = config.vsock->guest_cid;
    vc.uds_path = config.vsock->uds_path;
    add_virtio(MakeVirtioVsock(vc));
  }

  // A restored VM's kernel, tables and everything else are in its memory file.
  if (!image) {
    boot::BootSpec spec = config.boot;
    spec.cmdline = cmdline_;
    // mem_ was created just above and nothing has written to it yet.
    const uint64_t load_start = NowNs();
    plan_ = boot::LoadKernel(*mem_, spec, boot::RamState::Zero);
    boot_load_ns_ = NowNs() - load_start;
    boot::WriteMpTable(*mem_, config.cpus);
  }

  for (uint32_t i = 0; i < config.cpus; i++) CreateVcpu(i);
  if (!image) SetupBootRegisters(vcpus_[0]);
  // Opened here rather than on demand: the last figures must still be
  // readable after the VM stopped and its fds closed (ReleaseResources freezes them).
  // Only on request (VMLET_KVM_STATS=1, as the benchmarks and their test set it):
  // a VM that is not measured needs neither the fds nor their set-up time.
  const char* want_stats = getenv("VMLET_KVM_STATS");
  if (want_stats && std::string(want_stats) == "1") {
    std::vector<int> vcpu_fds;
    for (auto& v : vcpus_) vcpu_fds.push_back(v.fd);
    kvm_stats_ = std::make_unique<KvmStats>(vm_fd_, vcpu_fds);
  }
}

void Machine::CreateVcpu(uint32_t index) {
  Vcpu v;
  v.index = index;
  v.fd = ioctl(vm_fd_, KVM_CREATE_VCPU, static_cast<unsigned long>(index));
  if (v.fd < 0) throw SysError(ErrorKind::Kvm, "KVM_CREATE_VCPU", "vCPU " + std::to_string(index));
  void* p = mmap(nullptr, kvm_->vcpu_mmap_size(), PROT_READ | PROT_WRITE, MAP_SHARED, v.fd, 0);
  if (p == MAP_FAILED) {
    auto e = SysError(ErrorKind::Kvm, "mmap kvm_run", "vCPU " + std::to_string(index));
    close(v.fd);
    throw e;
  }
  v.run = static_cast<kvm_run*>(p);
  vcpus_.push_back(v);
  Vcpu& vc = vcpus_.back();
  SetupCpuid(vc);
  SetupMsrs(vc);
  SetupLapic(vc);
  kvm_fpu fpu{};
  fpu.fcw = 0x37f;     // FNINIT state
  fpu.mxcsr = 0x1f80;  // all SSE exceptions masked
  if (ioctl(vc.fd, KVM_SET_FPU, &fpu) != 0) throw SysError(ErrorKind::Kvm, "KVM_SET_FPU");
}

void Machine::SetupCpuid(Vcpu& v) {
  std::vector<kvm_cpuid_entry2> entries = kvm_->supported_cpuid();
  const bool tsc_deadline = kvm_->CheckExtension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
  for (auto& e : entries) {
    switch (e.function) {
      case 1:
        // APIC id of this vCPU, logical processor count, "running under a hypervisor".
        e.ebx = (e.ebx & 0x0000ffff) | (v.index << 24) | ((cpus_ & 0xff) << 16);
        e.ecx |= 1u << 31;
        if (cpus_ > 1) e.edx |= 1u << 28;  // HTT: the count in EBX[23:16] is valid
        // TSC-deadline LAPIC timer: KVM emulates it with the in-kernel LAPIC but
        // leaves the bit to the VMM (as QEMU and Firecracker set it). Without it
        // Linux calibrates the LAPIC timer against the PIT (~100 ms of ticks),
        // which under a loaded or nested host fails verification and leaves the
        // PIT as the tick for good: hack/bench/boot.bench.ts measured 318 PIT
        // interrupts and ~0.5 s more guest time to /init than QEMU in the lab.
        if (tsc_deadline) e.ecx |= 1u << 24;
        break;
      case 0xb:
      case 0x1f:
        e.edx = v.index;  // x2APIC id
        break;
      case 0x40000001:
        if (mask_kvm_paravirt_) e.eax = e.ebx = e.ecx = e.edx = 0;
        break;
      default: break;
    }
  }
  std::vector<uint8_t> buf(sizeof(CpuidHeader) + entries.size() * sizeof(kvm_cpuid_entry2));
  CpuidHeader h{static_cast<uint32_t>(entries.size()), 0};
  std::memcpy(buf.data(), &h, sizeof h);
  std::memcpy(buf.data() + sizeof h, entries.data(), entries.size() * sizeof(kvm_cpuid_entry2));
  if (ioctl(v.fd, kIoctlSetCpuid2, buf.data()) != 0) throw SysError(ErrorKind::Kvm, "KVM_SET_CPUID2", "vCPU " + std::to_string(v.index));
}

void Machine::SetupMsrs(Vcpu& v) {
  const auto& supported = kvm_->msr_index_list();
  std::vector<kvm_msr_entry> wanted;
  for (auto& m : kBootMsrs) {
    for (uint32_t s : supported) {
      if (s == m.index) {
        kvm_msr_entry e{};
        e.index = m.index;
        e.data = m.value;
        wanted.push_back(e);
        break;
      }
    }
  }
  std::vector<uint8_t> buf(sizeof(MsrsHeader) + wanted.size() * sizeof(kvm_msr_entry));
  MsrsHeader h{static_cast<uint32_t>(wanted.size()), 0};
  std::memcpy(buf.data(), &h, sizeof h);
  std::memcpy(buf.data() + sizeof h, wanted.data(), wanted.size() * sizeof(kvm_msr_entry));
  int n = ioctl(v.fd, kIoctlSetMsrs, buf.data());
  if (n < 0) throw SysError(ErrorKind::Kvm, "KVM_SET_MSRS", "vCPU " + std::to_string(v.index));
  // KVM_SET_MSRS stops at the first MSR it refuses and returns how many it set.
  if (static_cast<size_t>(n) != wanted.size())
    throw VmmError(ErrorKind::Kvm, "KVM_SET_MSRS",
                   "the host set " + std::to_string(n) + " of " + std::to_string(wanted.size()) +
                       " boot MSRs and refused MSR " + Hex(wanted[n].index) + " on vCPU " + std::to_string(v.index));
}

void Machine::SetupLapic(Vcpu& v) {
  kvm_lapic_state lapic{};
  if (ioctl(v.fd, KVM_GET_LAPIC, &lapic) != 0) throw SysError(ErrorKind::Kvm, "KVM_GET_LAPIC");
  auto set_lvt = [&](size_t off, uint32_t mode) {
    uint32_t val;
    std::memcpy(&val, lapic.regs + off, 4);
    val = (val & ~0x700u) | (mode << 8);
    std::memcpy(lapic.regs + off, &val, 4);
  };
  set_lvt(0x350, 7);  // LINT0: ExtINT, so the PIC's interrupts reach the CPU
  set_lvt(0x360, 4);  // LINT1: NMI
  if (ioctl(v.fd, KVM_SET_LAPIC, &lapic) != 0) throw SysError(ErrorKind::Kvm, "KVM_SET_LAPIC");
}

void Machine::SetupBootRegisters(Vcpu& v) {
  kvm_sregs sregs{};
  if (ioctl(v.fd, KVM_GET_SREGS, &sregs) != 0) throw SysError(ErrorKind::Kvm, "KVM_GET_SREGS");
  bool long_mode = plan_.protocol == boot::Protocol::Linux64;
  uint16_t cs_sel = long_mode ? boot::kSelCode64 : boot::kSelCode32;
  sregs.cs = SegmentFromGdt(boot::kGdt[cs_sel >> 3], cs_sel);
  kvm_segment data = SegmentFromGdt(boot::kGdt[boot::kSelData >> 3], boot::kSelData);
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.tr = SegmentFromGdt(boot::kGdt[boot::kSelTss >> 3], boot::kSelTss);
  sregs.gdt.base = boot::kGdtAddr;
  sregs.gdt.limit = sizeof(boot::kGdt) - 1;
  sregs.idt.base = 0;
  sregs.idt.limit = 0;
  if (long_mode) {
    sregs.cr3 = plan_.page_tables;
    sregs.cr4 = 0x20;                 // PAE
    sregs.cr0 = 0x80000000u | 0x31;   // PG | NE | ET | PE
    sregs.efer = 0x500;               // LME | LMA
  } else {
    // PVH: 32-bit protected mode, paging off (xen/include/public/arch-x86/hvm/start_info.h).
    sregs.cr0 = 0x11;  // ET | PE
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
  }
  if (ioctl(v.fd, KVM_SET_SREGS, &sregs) != 0) throw SysError(ErrorKind::Kvm, "KVM_SET_SREGS");
  kvm_regs regs{};
  regs.rflags = 0x2;
  regs.rip = plan_.entry;
  regs.rsp = plan_.stack;
  regs.rbp = plan_.stack;
  if (long_mode) regs.rsi = plan_.boot_info;
  else regs.rbx = plan_.boot_info;
  if (ioctl(v.fd, KVM_SET_REGS, &regs) != 0) throw SysError(ErrorKind::Kvm, "KVM_SET_REGS");
}

void Machine::Start(std::function<void(const VmExit&)> on_stopped) {
  std::lock_guard<std::mutex> g(mu_);
  if (torn_down_) throw VmmError(ErrorKind::InvalidArgument, "start VM", "the VM was already torn down: create a new one");
  if (started_) throw VmmError(ErrorKind::InvalidArgument, "start VM", "the VM is already started");
  KickSignal();
  on_stopped_ = std::move(on_stopped);
  started_ = true;
  running_threads_ = static_cast<uint32_t>(vcpus_.size());
  for (auto& v : vcpus_) {
    try {
      threads_.emplace_back([this, &v] { RunVcpu(v); });
      // Named here, before Start returns, so tools (and the leak tests) can
      // tell vCPU threads apart from the moment they exist.
      char name[16];
      snprintf(name, sizeof name, "vmlet-vcpu%u", v.index);
      pthread_setname_np(threads_.back().native_handle(), name);
    } catch (const std::system_error& e) {
      // Threads already started see stopping_ and leave without calling
      // on_stopped (the caller learns of the failure from this throw);
      // Teardown joins them.
      running_threads_ -= static_cast<uint32_t>(vcpus_.size() - threads_.size());
      stopping_ = true;
      on_stopped_ = nullptr;
      if (!exit_) exit_ = VmExit{VmExit::Reason::Error, 0, std::string("cannot start vCPU thread: ") + e.what(), 0, {}};
      throw VmmError(ErrorKind::Kvm, "start vCPU thread", e.what());
    }
  }
}

void Machine::RunVcpu(Vcpu& v) {
  t_run = v.run;
  {
    std::lock_guard<std::mutex> g(mu_);
    live_threads_.push_back(pthread_self());
  }
  bool io_pending = false;  // an IO/MMIO exit KVM completes at the next KVM_RUN
  for (;;) {
    // Cleared before the flags are read: a kick after this point either is
    // seen in the flags or makes the next KVM_RUN return at once.
    v.run->immediate_exit = 0;
    {
      std::unique_lock<std::mutex> lk(mu_);
      // A snapshot in progress keeps the vCPUs parked even if resumed meanwhile.
      while ((pause_requested_ || snapshotting_) && !stopping_) {
        // Hazard (KVM api.rst, KVM_RUN): an IO or MMIO exit is complete (RIP
        // past the instruction, an IN's value in its register) only once
        // KVM_RUN is entered again. A vCPU parked right after one would be
        // snapshotted at the instruction and replay it when restored (the
        // lab saw a serial line doubled). So before parking, enter once with
        // immediate_exit set: KVM finishes the operation and returns EINTR
        // without running guest code. Then the flags are read again.
        if (io_pending) {
          lk.unlock();
          v.run->immediate_exit = 1;
          ioctl(v.fd, KVM_RUN, 0);
          v.run->immediate_exit = 0;
          io_pending = false;
          lk.lock();
          continue;
        }
        parked_++;
        cv_.notify_all();
        cv_.wait(lk);
        parked_--;
      }
      if (stopping_) break;
    }
    if (first_entry_ns_.load(std::memory_order_relaxed) == 0) {
      uint64_t expected = 0;
      first_entry_ns_.compare_exchange_strong(expected, NowNs());
    }
    int rc = ioctl(v.fd, KVM_RUN, 0);
    io_pending = false;
    if (rc != 0) {
      if (errno == EINTR || errno == EAGAIN) {
        interrupted_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      int e = errno;
      RequestStop(VmExit{VmExit::Reason::Error, 0,
                         "KVM_RUN failed on vCPU " + std::to_string(v.index) + ": " + std::strerror(e) + " (errno " +
                             std::to_string(e) + ")",
                         0, {}});
      break;
    }
    uint32_t reason = v.run->exit_reason;
    exit_counts_[reason < exit_counts_.size() ? reason : 0].fetch_add(1, std::memory_order_relaxed);
    if (!HandleExit(v)) break;
    io_pending = reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO;
  }
  std::function<void(const VmExit&)> notify;
  VmExit exit;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (size_t i = 0; i < live_threads_.size(); i++) {
      if (pthread_equal(live_threads_[i], pthread_self())) {
        live_threads_.erase(live_threads_.begin() + static_cast<long>(i));
        break;
      }
    }
    running_threads_--;
    cv_.notify_all();
    if (running_threads_ == 0 && on_stopped_) {
      notify = std::move(on_stopped_);
      on_stopped_ = nullptr;
      exit = exit_ ? *exit_ : VmExit{VmExit::Reason::Error, 0, "vCPUs stopped without a reason", 0, {}};
    }
  }
  t_run = nullptr;
  if (notify) notify(exit);
}

bool Machine::HandleExit(Vcpu& v) {
  kvm_run* run = v.run;
  switch (run->exit_reason) {
    case KVM_EXIT_IO: {
      uint8_t* data = reinterpret_cast<uint8_t*>(run) + run->io.data_offset;
      for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
        if (run->io.direction == KVM_EXIT_IO_OUT) {
          if (!pio_.Write(run->io.port, data, run->io.size)) unclaimed_io_.fetch_add(1, std::memory_order_relaxed);
        } else if (!pio_.Read(run->io.port, data, run->io.size)) {
          std::memset(data, 0xff, run->io.size);
          unclaimed_io_.fetch_add(1, std::memory_order_relaxed);
        }
      }
      return true;
    }
    case KVM_EXIT_MMIO: {
      auto& m = run->mmio;
      bool claimed = m.is_write ? mmio_.Write(m.phys_addr, m.data, m.len) : mmio_.Read(m.phys_addr, m.data, m.len);
      if (!claimed) {
        if (!m.is_write) std::memset(m.data, 0xff, m.len);
        unclaimed_mmio_.fetch_add(1, std::memory_order_relaxed);
        if (!mmio_logged_.exchange(true))
          fprintf(stderr, "vmlet: guest %s unclaimed MMIO at %s (%u bytes); further ones are only counted\n",
                  m.is_write ? "wrote" : "read", Hex(m.phys_addr).c_str(), m.len);
      }
      return true;
    }
    case KVM_EXIT_SHUTDOWN: {
      kvm_regs regs{};
      kvm_sregs sregs{};
      ioctl(v.fd, KVM_GET_REGS, &regs);
      ioctl(v.fd, KVM_GET_SREGS, &sregs);
      std::string where;
      // Hazard: on AMD (SVM) KVM reinitialises the vCPU on a shutdown
      // intercept before exiting, so its registers show the reset vector, not
      // the faulting instruction. Say so rather than report a false RIP.
      if (regs.rip == 0xfff0 && sregs.cs.base == 0xffff0000)
        where = "the host reset the vCPU on the triple fault (as AMD SVM does), so its last RIP is unknown";
      else
        where = "last RIP " + Hex(regs.rip);
      VmExit e{VmExit::Reason::Shutdown, 0,
               "vCPU " + std::to_string(v.index) + " triple-faulted (KVM_EXIT_SHUTDOWN); " + where, regs.rip, {}};
      RequestStop(std::move(e));
      return false;
    }
    case KVM_EXIT_INTERNAL_ERROR:
      if (run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION) {
        EmulationFailure(v);
      } else {
        RequestStop(VmExit{VmExit::Reason::Error, 0,
                           "KVM internal error on vCPU " + std::to_string(v.index) + ", suberror " +
                               std::to_string(run->internal.suberror),
                           0, {}});
      }
      return false;
    case KVM_EXIT_FAIL_ENTRY:
      RequestStop(VmExit{VmExit::Reason::Error, 0,
                         "VM entry failed on vCPU " + std::to_string(v.index) + ": hardware entry failure reason " +
                             Hex(run->fail_entry.hardware_entry_failure_reason) +
                             " (the boot register state is invalid for this CPU)",
                         0, {}});
      return false;
    case KVM_EXIT_SYSTEM_EVENT: {
      VmExit e;
      switch (run->system_event.type) {
        case KVM_SYSTEM_EVENT_RESET:
          e.reason = VmExit::Reason::Reset;
          e.message = "guest requested a reset (KVM_SYSTEM_EVENT_RESET)";
          break;
        case KVM_SYSTEM_EVENT_SHUTDOWN:
          e.reason = VmExit::Reason::Shutdown;
          e.message = "guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN)";
          break;
        default:
          e.reason = VmExit::Reason::Error;
          e.message = "guest system event " + std::to_string(run->system_event.type) + " (e.g. a crash) on vCPU " +
                      std::to_string(v.index);
          break;
      }
      RequestStop(std::move(e));
      return false;
    }
    case KVM_EXIT_HLT:
      // With the in-kernel LAPIC a halted vCPU sleeps in KVM; reaching here
      // means nothing can ever wake it.
      RequestStop(VmExit{VmExit::Reason::Error, 0,
                         "vCPU " + std::to_string(v.index) + " halted with no in-kernel interrupt controller to wake it", 0, {}});
      return false;
    case KVM_EXIT_INTR:
      return true;
    default: {
      const char* name = ExitName(run->exit_reason);
      RequestStop(VmExit{VmExit::Reason::Error, 0,
                         "unhandled KVM exit reason " + std::to_string(run->exit_reason) + " (" +
                             (name ? name : "unknown to vmlet") + ") on vCPU " + std::to_string(v.index),
                         0, {}});
      return false;
    }
  }
}

void Machine::EmulationFailure(Vcpu& v) {
  VmExit e;
  e.reason = VmExit::Reason::EmulationFailure;
  kvm_regs regs{};
  kvm_sregs sregs{};
  ioctl(v.fd, KVM_GET_REGS, &regs);
  ioctl(v.fd, KVM_GET_SREGS, &sregs);
  e.rip = regs.rip;
  // Up to 15 bytes (the longest x86 instruction), translated page by page:
  // an instruction may straddle two pages mapped to unrelated frames.
  uint64_t linear = sregs.cs.base + regs.rip;
  const char* why = nullptr;
  while (e.instruction.size() < 15) {
    kvm_translation tr{};
    tr.linear_address = linear + e.instruction.size();
    if (ioctl(v.fd, KVM_TRANSLATE, &tr) != 0 || !tr.valid) {
      why = "RIP is not mapped by the guest's page tables";
      break;
    }
    uint64_t page_left = 4096 - (tr.physical_address & 0xfff);
    uint64_t n = std::min<uint64_t>(page_left, 15 - e.instruction.size());
    uint8_t buf[15];
    if (!mem_->Read(tr.physical_address, buf, n)) {
      why = "RIP is not in guest RAM (an MMIO hole or past the end of memory)";
      break;
    }
    e.instruction.insert(e.instruction.end(), buf, buf + n);
  }
  std::string bytes;
  for (uint8_t b : e.instruction) {
    char h[4];
    snprintf(h, sizeof h, "%02x ", b);
    bytes += h;
  }
  if (!bytes.empty()) bytes.pop_back();
  e.message = "KVM could not emulate the instruction at RIP " + Hex(e.rip) + " on vCPU " + std::to_string(v.index) +
              (e.instruction.empty() ? std::string(": ") + (why ? why : "instruction bytes unreadable")
                                     : ": bytes " + bytes);
  RequestStop(std::move(e));
}

void Machine::Kick() {
  int sig = KickSignal();
  for (pthread_t t : live_threads_) pthread_kill(t, sig);
}

void Machine::RequestStop(VmExit why) {
  std::lock_guard<std::mutex> g(mu_);
  if (!exit_) exit_ = std::move(why);
  stopping_ = true;
  Kick();
  cv_.notify_all();
}

uint64_t Machine::RequestPause() {
  std::lock_guard<std::mutex> g(mu_);
  if (!started_) throw VmmError(ErrorKind::InvalidArgument, "pause VM", "the VM is not started: call start() first");
  if (!stopping_) {
    pause_requested_ = true;
    Kick();
  }
  return pause_generation_;
}

void Machine::WaitPaused(uint64_t generation) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return stopping_ || pause_generation_ != generation || parked_ >= running_threads_; });
}

void Machine::Resume() {
  std::lock_guard<std::mutex> g(mu_);
  pause_requested_ = false;
  pause_generation_++;
  cv_.notify_all();
}

VmExit Machine::Teardown() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (torn_down_) return exit_ ? *exit_ : VmExit{VmExit::Reason::Killed, 0, {}, 0, {}};
    if (!exit_) exit_ = VmExit{VmExit::Reason::Killed, 0, {}, 0, {}};
    stopping_ = true;
    pause_requested_ = false;
    Kick();
    cv_.notify_all();
  }
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
  {
    // A snapshot still reading vCPU state and RAM finishes before they go.
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return !snapshotting_; });
  }
  ReleaseResources();
  std::lock_guard<std::mutex> g(mu_);
  torn_down_ = true;
  return *exit_;
}

void Machine::ReleaseResources() {
  // Devices first (they may own threads and hold guest memory and IRQ lines),
  // then vCPUs, the VM, and RAM last: nothing may touch RAM once it is unmapped.
  // The vCPUs are joined: these are the last values, read before the fds go.
  if (kvm_stats_) kvm_stats_->Freeze();
  for (auto& d : virtio_devices_) d->Shutdown();
  if (serial_) serial_->Flush();
  mmio_ = Bus();
  pio_ = Bus();
  virtio_devices_.clear();
  transports_.clear();
  rtc_.reset();
  serial_.reset();
  for (auto& v : vcpus_) {
    if (v.run) munmap(v.run, kvm_->vcpu_mmap_size());
    if (v.fd >= 0) close(v.fd);
  }
  vcpus_.clear();
  if (vm_fd_ >= 0) close(vm_fd_);
  vm_fd_ = -1;
  mem_.reset();
  kvm_.reset();
}

std::map<std::string, uint64_t> Machine::KvmStatistics() const {
  if (!kvm_stats_) throw VmmError(ErrorKind::Kvm, "read KVM statistics", "KVM statistics are collected only for a VM created with VMLET_KVM_STATS=1 in the environment");
  return kvm_stats_->Snapshot();
}

void Machine::AttachDisk(uint32_t index, const std::string& path) {
  // Disks are the first virtio devices, in config order (Build); the list is
  // fixed once built, and the device locks against its own queue work.
  if (index >= config_.disks.size())
    throw VmmError(ErrorKind::InvalidArgument, "attach disk",
                   "disk " + std::to_string(index) + " does not exist: this VM has " + std::to_string(config_.disks.size()) + " disk(s)");
  // Copied under mu_ before Teardown may clear the list: the device stays
  // alive for the attach even if the VM stops meanwhile.
  std::shared_ptr<virtio::VirtioDevice> disk;
  std::shared_ptr<MmioTransport> transport;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_ || torn_down_) throw VmmError(ErrorKind::InvalidArgument, "attach disk", "the VM has stopped or is stopping");
    disk = virtio_devices_[index];
    transport = transports_[index];
  }
  BlkAttachMedium(*disk, path);
  // An empty slot had no I/O thread (blk.cc QueueNotifyFd): with its medium it
  // gets one, and its notify leaves the exit path.
  transport->BindNewNotifiers();
}

MachineStats Machine::Stats() const {
  MachineStats s;
  s.created_ns = created_ns_;
  s.first_entry_ns = first_entry_ns_.load();
  s.restored_ns = restored_ns_;
  s.boot_load_ns = boot_load_ns_;
  s.from_shell = from_shell_;
  s.overlay_bytes = overlay_bytes_;
  for (size_t i = 0; i < exit_counts_.size(); i++) {
    uint64_t n = exit_counts_[i].load(std::memory_order_relaxed);
    if (!n) continue;
    const char* name = ExitName(static_cast<uint32_t>(i));
    s.exits.emplace_back(name ? name : "reason-" + std::to_string(i), n);
  }
  if (uint64_t n = unclaimed_io_.load()) s.exits.emplace_back("io-unclaimed", n);
  if (uint64_t n = unclaimed_mmio_.load()) s.exits.emplace_back("mmio-unclaimed", n);
  if (uint64_t n = interrupted_.load()) s.exits.emplace_back("kicked", n);
  return s;
}

}  // namespace vmlet::kvm
