// Taking a snapshot of a paused Machine and building a Machine from one.
// Member functions of kvm::Machine live here so that machine.cc keeps only
// the boot path; both share Build().
#include <dirent.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "devices/rtc.h"
#include "devices/serial.h"
#include "devices/vsock.h"
#include "kvm/machine.h"
#include "kvm/stats.h"  // Machine owns a KvmStats; constructing one here needs the full type
#include "snapshot/memory.h"
#include "snapshot/snapshot.h"
#include "virtio/mmio.h"

namespace vmlet {

namespace snapshot {

namespace {

uint64_t NowNs() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

std::string HexBytes(const uint8_t* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; i++) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

std::string Sha256Hex(const void* p, size_t n) {
  uint8_t md[32];
  unsigned len = 0;
  EVP_Digest(p, n, md, &len, EVP_sha256(), nullptr);
  return HexBytes(md, 32);
}

std::string Sha256File(const std::string& path) {
  FILE* f = fopen(path.c_str(), "rbe");
  if (!f) throw SysError(ErrorKind::Snapshot, "hash boot file", path);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<uint8_t> buf(1 << 20);
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), f)) > 0) EVP_DigestUpdate(ctx, buf.data(), n);
  bool err = ferror(f);
  fclose(f);
  uint8_t md[32];
  unsigned len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  if (err) throw VmmError(ErrorKind::Snapshot, "hash boot file", path + ": read error");
  return HexBytes(md, 32);
}

void EncodeIdentity(Writer& w, const FileIdentity& f) {
  w.Str(f.path);
  w.U64(f.size);
  w.U64(static_cast<uint64_t>(f.mtime_ns));
  w.Str(f.sha256);
}
FileIdentity DecodeIdentity(Reader& r) {
  FileIdentity f;
  f.path = r.Str(4096);
  f.size = r.U64();
  f.mtime_ns = static_cast<int64_t>(r.U64());
  f.sha256 = r.Str(64);
  return f;
}

// The identity recorded at creation, hashed now; refused if the file changed
// in between (the snapshot's memory holds the old one).
FileIdentity HashIdentity(const FileIdentity& at_boot) {
  if (!at_boot.sha256.empty()) return at_boot;  // a restored VM inherits its snapshot's
  FileIdentity now = FileIdentity::Stat(at_boot.path);
  if (now.size != at_boot.size || now.mtime_ns != at_boot.mtime_ns)
    throw VmmError(ErrorKind::Snapshot, "snapshot VM",
                   at_boot.path + " changed since the VM booted from it: the snapshot could not say which kernel/initrd it holds");
  now.sha256 = Sha256File(at_boot.path);
  return now;
}

void MakeEmptyDir(const std::string& dir) {
  if (mkdir(dir.c_str(), 0700) == 0) return;
  if (errno != EEXIST) throw SysError(ErrorKind::Snapshot, "create snapshot directory", dir);
  DIR* d = opendir(dir.c_str());
  if (!d) throw SysError(ErrorKind::Snapshot, "open snapshot directory", dir);
  bool empty = true;
  while (dirent* e = readdir(d)) {
    if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) {
      empty = false;
      break;
    }
  }
  closedir(d);
  if (!empty)
    throw VmmError(ErrorKind::InvalidArgument, "snapshot VM", dir + " exists and is not empty: pass a new or empty directory");
}

}  // namespace

FileIdentity FileIdentity::Stat(const std::string& path) {
  FileIdentity f;
  f.path = path;
  struct stat st {};
  if (stat(path.c_str(), &st) == 0) {
    f.size = uint64_t(st.st_size);
    f.mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  }
  return f;
}

void SnapshotConfig::Encode(Writer& w) const {
  w.U64(memory_bytes);
  w.U32(cpus);
  w.Bool(mask_kvm_paravirt);
  w.Str(boot_cmdline);
  w.Str(cmdline);
  EncodeIdentity(w, kernel);
  w.Bool(initrd.has_value());
  if (initrd) EncodeIdentity(w, *initrd);
  w.U32(static_cast<uint32_t>(disks.size()));
  for (auto& d : disks) {
    w.Bool(d.read_only);
    w.Str(d.id);
  }
  w.Bool(has_vsock);
  w.U64(vsock_cid);
  w.U32(static_cast<uint32_t>(regions.size()));
  for (auto& r : regions) {
    w.U64(r.gpa);
    w.U64(r.size);
    w.U64(r.file_offset);
  }
  w.U64(memory_file_bytes);
  w.U64(memory_data_bytes);
  w.U32(memory_crc);
}

SnapshotConfig SnapshotConfig::Decode(Reader& r) {
  SnapshotConfig c;
  c.memory_bytes = r.U64();
  c.cpus = r.U32();
  if (c.cpus < 1 || c.cpus > 254) r.Fail(std::to_string(c.cpus) + " vCPUs");
  c.mask_kvm_paravirt = r.Bool();
  c.boot_cmdline = r.Str(65536);
  c.cmdline = r.Str(65536);
  c.kernel = DecodeIdentity(r);
  if (r.Bool()) c.initrd = DecodeIdentity(r);
  uint32_t nd = r.U32();
  if (nd > 32) r.Fail(std::to_string(nd) + " disks");
  for (uint32_t i = 0; i < nd; i++) {
    Disk d;
    d.read_only = r.Bool();
    d.id = r.Str(64);
    c.disks.push_back(d);
  }
  c.has_vsock = r.Bool();
  c.vsock_cid = r.U64();
  uint32_t nr = r.U32();
  if (nr < 1 || nr > 8) r.Fail(std::to_string(nr) + " RAM regions");
  for (uint32_t i = 0; i < nr; i++) {
    Region g{};
    g.gpa = r.U64();
    g.size = r.U64();
    g.file_offset = r.U64();
    c.regions.push_back(g);
  }
  c.memory_file_bytes = r.U64();
  c.memory_data_bytes = r.U64();
  c.memory_crc = r.U32();
  r.ExpectEnd();
  return c;
}

HostFingerprint HostFingerprint::Of(const kvm::Kvm& kvm, const CpuCaps& caps) {
  HostFingerprint h;
  const auto& cpuid = kvm.supported_cpuid();
  // Only the defined fields (the entries' padding is whatever the buffer
  // held), and without the APIC ids: some KVMs (this host's PVM) report the
  // id of the host CPU the ioctl ran on, and the VMM sets them per vCPU anyway.
  Writer fields;
  for (auto& e : cpuid) {
    uint32_t ebx = e.function == 1 ? e.ebx & 0x00ffffff : e.ebx;
    uint32_t edx = e.function == 0xb || e.function == 0x1f ? 0 : e.edx;
    uint32_t eax = e.function == 0x8000001e ? 0 : e.eax;
    for (uint32_t v : {e.function, e.index, e.flags, eax, ebx, e.ecx, edx}) fields.U32(v);
  }
  h.cpuid_sha256 = Sha256Hex(fields.data().data(), fields.data().size());
  for (auto& e : cpuid) {
    if (e.function == 0) {
      char v[13] = {};
      std::memcpy(v, &e.ebx, 4);
      std::memcpy(v + 4, &e.edx, 4);
      std::memcpy(v + 8, &e.ecx, 4);
      h.vendor = v;
    } else if (e.function == 1) {
      h.family_model = e.eax;
    }
  }
  h.xsave_bytes = caps.xsave_bytes;
  h.xcrs = caps.xcrs;
  h.debugregs = caps.debugregs;
  return h;
}

void HostFingerprint::CheckSame(const HostFingerprint& here) const {
  char buf[64];
  auto cpu = [&](const HostFingerprint& f) {
    snprintf(buf, sizeof buf, "%s signature 0x%x", f.vendor.c_str(), f.family_model);
    return std::string(buf);
  };
  if (cpuid_sha256 != here.cpuid_sha256)
    throw VmmError(ErrorKind::Snapshot, "restore VM",
                   "the snapshot was taken on another CPU or KVM (" + cpu(*this) + ", CPUID " + cpuid_sha256.substr(0, 12) +
                       ") than this one (" + cpu(here) + ", CPUID " + here.cpuid_sha256.substr(0, 12) +
                       "): its vCPU state is only valid there; take a new snapshot on this host");
  if (xsave_bytes != here.xsave_bytes || xcrs != here.xcrs || debugregs != here.debugregs)
    throw VmmError(ErrorKind::Snapshot, "restore VM",
                   "the snapshot was taken under a KVM with other save areas (XSAVE " + std::to_string(xsave_bytes) +
                       " bytes, here " + std::to_string(here.xsave_bytes) + "): take a new snapshot on this host");
}

void HostFingerprint::Encode(Writer& w) const {
  w.Str(cpuid_sha256);
  w.Str(vendor);
  w.U32(family_model);
  w.U32(xsave_bytes);
  w.Bool(xcrs);
  w.Bool(debugregs);
}

HostFingerprint HostFingerprint::Decode(Reader& r) {
  HostFingerprint h;
  h.cpuid_sha256 = r.Str(64);
  h.vendor = r.Str(16);
  h.family_model = r.U32();
  h.xsave_bytes = r.U32();
  h.xcrs = r.Bool();
  h.debugregs = r.Bool();
  r.ExpectEnd();
  return h;
}

Image Image::FromSections(const std::vector<Section>& sections, const std::string& dir) {
  Image img;
  img.dir = dir;
  img.version = kFormatVersion;
  auto need = [&](uint32_t id, const char* name) -> const Section& {
    const Section* s = FindSection(sections, id);
    if (!s) throw VmmError(ErrorKind::Snapshot, "read snapshot", dir + ": the " + std::string(name) + " section is missing");
    return *s;
  };
  auto reader = [&](const Section& s, const std::string& what) { return Reader(s.data.data(), s.data.size(), dir + " " + what); };
  {
    Reader r = reader(need(kSectionConfig, "config"), "config");
    img.config = SnapshotConfig::Decode(r);
  }
  {
    Reader r = reader(need(kSectionHost, "host"), "host");
    img.host = HostFingerprint::Decode(r);
  }
  {
    Reader r = reader(need(kSectionVm, "VM"), "VM state");
    img.vm = VmState::Decode(r);
  }
  for (uint32_t i = 0; i < img.config.cpus; i++) {
    std::string what = "vCPU " + std::to_string(i);
    Reader r = reader(need(kSectionVcpu + i, what.c_str()), what);
    img.vcpus.push_back(VcpuState::Decode(r));
  }
  img.serial = need(kSectionSerial, "serial").data;
  img.rtc = need(kSectionRtc, "RTC").data;
  size_t ndev = img.config.disks.size() + (img.config.has_vsock ? 1 : 0);
  for (uint32_t i = 0; i < ndev; i++) {
    std::string what = "virtio device " + std::to_string(i);
    img.devices.push_back(need(kSectionDevice + i, what.c_str()).data);
  }
  // Nothing the config does not account for: a section this vmlet does not
  // know means the file was made by another one.
  size_t expected = 5 + img.config.cpus + ndev;
  if (sections.size() != expected)
    throw VmmError(ErrorKind::Snapshot, "read snapshot",
                   dir + ": " + std::to_string(sections.size()) + " sections where the config accounts for " + std::to_string(expected));
  uint64_t total = 0;
  for (auto& g : img.config.regions) {
    if (g.file_offset != total) throw VmmError(ErrorKind::Snapshot, "read snapshot", dir + ": RAM regions out of order in the memory file");
    total += g.size;
  }
  if (total != img.config.memory_bytes || img.config.memory_file_bytes != total)
    throw VmmError(ErrorKind::Snapshot, "read snapshot", dir + ": the RAM regions do not add up to the memory size");
  return img;
}

Image Image::Load(const std::string& dir) {
  Image img = FromSections(ReadStateFile(dir + "/" + kStateFile), dir);
  img.memory_path = dir + "/" + kMemoryFile;
  struct stat st {};
  if (stat(img.memory_path.c_str(), &st) != 0)
    throw SysError(ErrorKind::Snapshot, "open snapshot memory file", img.memory_path);
  if (!S_ISREG(st.st_mode) || uint64_t(st.st_size) != img.config.memory_file_bytes)
    throw VmmError(ErrorKind::Snapshot, "read snapshot",
                   img.memory_path + " is " + std::to_string(st.st_size) + " bytes; the snapshot recorded " +
                       std::to_string(img.config.memory_file_bytes) + " (truncated or replaced)");
  img.memory_allocated_bytes = uint64_t(st.st_blocks) * 512;
  return img;
}

kvm::MachineConfig RestoreConfig(const Image& image, const RestoreOptions& o) {
  const SnapshotConfig& c = image.config;
  auto bad = [&](const std::string& why) { throw VmmError(ErrorKind::Snapshot, "restore VM", image.dir + ": " + why); };
  if (o.disks.size() != c.disks.size())
    bad("the snapshot has " + std::to_string(c.disks.size()) + " disk(s), " + std::to_string(o.disks.size()) +
        " given: pass the same disks, in the same order");
  for (size_t i = 0; i < c.disks.size(); i++)
    if (o.disks[i].read_only != c.disks[i].read_only)
      bad("disk " + std::to_string(i) + " was " + (c.disks[i].read_only ? "read-only" : "writable") +
          " in the snapshot: pass the same readOnly");
  if (c.has_vsock && !o.vsock) bad("the snapshot has a vsock device: pass vsock { cid, udsPath }");
  if (!c.has_vsock && o.vsock) bad("the snapshot has no vsock device: leave vsock out");
  kvm::MachineConfig m;
  m.kvm_device = o.kvm_device;
  m.boot.kernel = c.kernel.path;
  if (c.initrd) m.boot.initrd = c.initrd->path;
  m.boot.cmdline = c.boot_cmdline;
  m.memory_bytes = c.memory_bytes;
  m.cpus = c.cpus;
  m.serial_log = o.serial_log;
  m.disks = o.disks;
  m.vsock = o.vsock;
  m.mask_kvm_paravirt = c.mask_kvm_paravirt;
  m.memory_overlays = o.memory_overlays;
  return m;
}

std::unique_ptr<kvm::Machine> Restore(const RestoreOptions& o) {
  uint64_t began = NowNs();
  Image image = Image::Load(o.dir);
  const SnapshotConfig& c = image.config;
  if (!o.expect_kernel_sha256.empty() && o.expect_kernel_sha256 != c.kernel.sha256)
    throw VmmError(ErrorKind::Snapshot, "restore VM",
                   o.dir + " was booted from another kernel (" + c.kernel.path + ", SHA-256 " + c.kernel.sha256 + "): make a new snapshot");
  if (!o.expect_initrd_sha256.empty() && (!c.initrd || o.expect_initrd_sha256 != c.initrd->sha256))
    throw VmmError(ErrorKind::Snapshot, "restore VM",
                   o.dir + (c.initrd ? " was booted from another initrd (" + c.initrd->path + ", SHA-256 " + c.initrd->sha256 + ")"
                                     : std::string(" was booted without an initrd")) +
                       ": make a new snapshot");
  if (o.verify_memory) {
    uint32_t crc = MemoryFileCrc(image.memory_path);
    if (crc != image.config.memory_crc)
      throw VmmError(ErrorKind::Snapshot, "restore VM", image.memory_path + ": memory checksum mismatch (the file is corrupt)");
  }
  kvm::MachineConfig config = RestoreConfig(image, o);
  return std::make_unique<kvm::Machine>(config, image, began);
}

}  // namespace snapshot

namespace kvm {

Machine::Machine(const MachineConfig& config, const snapshot::Image& image, uint64_t restore_began_ns) {
  created_ns_ = snapshot::NowNs();
  restored_ns_ = restore_began_ns;
  try {
    Build(config, &image);
    RestoreState(image);
  } catch (...) {
    ReleaseResources();
    throw;
  }
}

void Machine::RestoreState(const snapshot::Image& image) {
  using namespace snapshot;
  kernel_id_ = image.config.kernel;
  if (image.config.initrd) initrd_id_ = *image.config.initrd;
  CpuCaps caps = CpuCaps::Probe(*kvm_, vm_fd_);
  image.host.CheckSame(HostFingerprint::Of(*kvm_, caps));
  // The device layout the guest saw is in its command line: the same config
  // must give the same one, or devices would sit where the guest does not look.
  if (cmdline_ != image.config.cmdline)
    throw VmmError(ErrorKind::Snapshot, "restore VM", "the devices given lay out differently from the snapshot's: guest saw '" +
                                                          image.config.cmdline + "', now '" + cmdline_ + "'");
  auto layout = boot::RamLayout(image.config.memory_bytes);
  if (layout.size() != image.config.regions.size())
    throw VmmError(ErrorKind::Snapshot, "restore VM", "this vmlet lays out RAM differently from the snapshot's");
  for (size_t i = 0; i < layout.size(); i++)
    if (layout[i].first != image.config.regions[i].gpa || layout[i].second != image.config.regions[i].size)
      throw VmmError(ErrorKind::Snapshot, "restore VM", "this vmlet lays out RAM differently from the snapshot's");

  // VM-wide state first (the IOAPIC routes, the PIT, the clock), then each
  // vCPU (its LAPIC must hold its state before any device interrupt is
  // delivered into it), devices last: a re-activated device may interrupt.
  RestoreVm(vm_fd_, image.vm);
  for (auto& v : vcpus_) RestoreVcpu(v.fd, v.index, caps, image.vcpus[v.index]);
  {
    Reader r(image.serial.data(), image.serial.size(), "serial");
    serial_->RestoreState(r);
  }
  {
    Reader r(image.rtc.data(), image.rtc.size(), "RTC");
    rtc_->RestoreState(r);
  }
  for (size_t i = 0; i < transports_.size(); i++) {
    Reader r(image.devices[i].data(), image.devices[i].size(), "virtio device " + std::to_string(i));
    transports_[i]->RestoreState(r);
  }
  // The guest's vsock connections pointed at the old VM's host sockets.
  if (config_.vsock)
    for (auto& d : virtio_devices_)
      if (d->device_id() == vsock::kDeviceId) vsock_reset_sent_ = VsockSendTransportReset(*d);
}

bool Machine::paused() const {
  std::lock_guard<std::mutex> g(mu_);
  return started_ && !stopping_ && !torn_down_ && pause_requested_ && parked_ >= running_threads_;
}

snapshot::Summary Machine::Snapshot(const std::string& dir) {
  using namespace snapshot;
  uint64_t t0 = NowNs();
  // snapshotting_ keeps the vCPUs parked (a resume() meanwhile takes effect
  // after) and holds off Teardown's release of fds and RAM (a kill() meanwhile
  // waits for us), without holding mu_: resume/kill run on the JS thread.
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!(started_ && !stopping_ && !torn_down_ && pause_requested_ && parked_ >= running_threads_))
      throw VmmError(ErrorKind::InvalidArgument, "snapshot VM",
                     torn_down_ || stopping_ ? "the VM has stopped" : "the VM is not paused: await pause() first");
    if (snapshotting_) throw VmmError(ErrorKind::InvalidArgument, "snapshot VM", "a snapshot of this VM is already being taken");
    if (dir.empty()) throw VmmError(ErrorKind::InvalidArgument, "snapshot VM", "no directory given");
    snapshotting_ = true;
  }
  struct Done {
    Machine* m;
    ~Done() {
      std::lock_guard<std::mutex> g(m->mu_);
      m->snapshotting_ = false;
      m->cv_.notify_all();
    }
  } done{this};
  Summary sum;
  sum.dir = dir;
  CpuCaps caps = CpuCaps::Probe(*kvm_, vm_fd_);
  sum.skipped = caps.skipped();
  SnapshotConfig c;
  c.memory_bytes = mem_->total_size();
  c.cpus = cpus_;
  c.mask_kvm_paravirt = mask_kvm_paravirt_;
  c.boot_cmdline = config_.boot.cmdline;
  c.cmdline = cmdline_;
  c.kernel = HashIdentity(kernel_id_);
  if (!initrd_id_.path.empty()) c.initrd = HashIdentity(initrd_id_);
  for (auto& d : config_.disks) c.disks.push_back({d.read_only, d.id});
  c.has_vsock = config_.vsock.has_value();
  c.vsock_cid = c.has_vsock ? config_.vsock->guest_cid : 0;
  for (auto& r : mem_->regions()) c.regions.push_back({r.gpa, r.size, r.fd_offset});

  // Device threads stop touching rings and RAM until the memory file is written.
  struct Quiesced {
    std::vector<std::shared_ptr<virtio::VirtioDevice>>& devs;
    explicit Quiesced(std::vector<std::shared_ptr<virtio::VirtioDevice>>& d) : devs(d) {
      for (auto& x : devs) x->QuiesceForSnapshot();
    }
    ~Quiesced() {
      for (auto& x : devs) x->EndQuiesceForSnapshot();
    }
  } quiesced(virtio_devices_);

  std::vector<Section> sections;
  auto add = [&](uint32_t id, const Writer& w) { sections.push_back(Section{id, w.data()}); };
  {
    Writer w;
    HostFingerprint::Of(*kvm_, caps).Encode(w);
    add(kSectionHost, w);
  }
  {
    Writer w;
    SaveVm(vm_fd_).Encode(w);
    add(kSectionVm, w);
  }
  for (auto& v : vcpus_) {
    Writer w;
    std::vector<uint32_t> refused;
    SaveVcpu(v.fd, caps, kvm_->msr_index_list(), &refused).Encode(w);
    if (v.index == 0) sum.refused_msrs = refused;
    add(kSectionVcpu + v.index, w);
  }
  {
    Writer w;
    serial_->Flush();  // the old VM's log gets its unfinished line before the state is taken
    serial_->SaveState(w);
    add(kSectionSerial, w);
  }
  {
    Writer w;
    rtc_->SaveState(w);
    add(kSectionRtc, w);
  }
  for (size_t i = 0; i < transports_.size(); i++) {
    Writer w;
    transports_[i]->SaveState(w);
    add(kSectionDevice + static_cast<uint32_t>(i), w);
  }

  MakeEmptyDir(dir);
  std::string mem_path = dir + "/" + kMemoryFile;
  MemoryFileInfo mi;
  try {
    mi = WriteMemoryFile(*mem_, mem_path);
    c.memory_file_bytes = mi.logical_bytes;
    c.memory_data_bytes = mi.data_bytes;
    c.memory_crc = mi.crc;
    Writer w;
    c.Encode(w);
    sections.insert(sections.begin(), Section{kSectionConfig, w.data()});
    WriteStateFile(dir + "/" + kStateFile, sections);
  } catch (...) {
    unlink(mem_path.c_str());
    throw;
  }
  sum.memory_bytes = c.memory_bytes;
  sum.memory_file_bytes = mi.allocated_bytes;
  sum.memory_data_bytes = mi.data_bytes;
  sum.cpus = cpus_;
  sum.kernel_sha256 = c.kernel.sha256;
  sum.duration_ns = NowNs() - t0;
  return sum;
}

}  // namespace kvm
}  // namespace vmlet
