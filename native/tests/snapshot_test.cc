// The snapshot state file and memory file without KVM: the container
// round-trips, every truncation and every flipped bit is refused with
// VmmError(Snapshot), a fingerprint of another CPU is refused, and the memory
// file holds only non-zero pages and maps back copy-on-write.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>

#include "core/error.h"
#include "snapshot/cpu_state.h"
#include "snapshot/format.h"
#include "snapshot/memory.h"
#include "snapshot/snapshot.h"
#include "testing.h"

using namespace vmlet;
using namespace vmlet::snapshot;

namespace {

std::vector<Section> SampleSections() {
  std::vector<Section> s;
  for (uint32_t id : {kSectionConfig, kSectionHost, kSectionVm, kSectionVcpu, kSectionDevice}) {
    Section x;
    x.id = id;
    for (uint32_t i = 0; i < 40 + id % 7; i++) x.data.push_back(static_cast<uint8_t>(id * 31 + i));
    s.push_back(x);
  }
  s.push_back(Section{kSectionRtc, {}});  // an empty section is legal
  return s;
}

// The message of the Snapshot-kind error `fn` throws; fails if it throws none or another.
template <typename Fn>
std::string SnapshotErrorOf(Fn fn) {
  try {
    fn();
  } catch (const VmmError& e) {
    if (e.kind() != ErrorKind::Snapshot) throw testing::Failure(std::string("wrong error kind: ") + e.what());
    return e.what();
  } catch (const std::exception& e) {
    throw testing::Failure(std::string("not a VmmError: ") + e.what());
  }
  throw testing::Failure("expected a SnapshotError");
}

bool Contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

struct TempDir {
  std::string path;
  TempDir() {
    char t[] = "/tmp/vmlet-snap-test-XXXXXX";
    path = mkdtemp(t);
  }
  ~TempDir() { (void)!system(("rm -rf '" + path + "'").c_str()); }
};

std::string FileBytes(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw testing::Failure("cannot open " + path);
  std::string out;
  char buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, size_t(n));
  close(fd);
  return out;
}

// Whether the page at `p` is in memory (mincore); a snapshot must not populate RAM it skips.
bool Resident(const uint8_t* p) {
  unsigned char v = 0;
  if (mincore(const_cast<uint8_t*>(p), 4096, &v) != 0) throw testing::Failure("mincore failed");
  return v & 1;
}

}  // namespace

TEST_CASE("snapshot: the state file round-trips sections byte for byte") {
  auto in = SampleSections();
  auto bytes = EncodeStateFile(in);
  auto out = DecodeStateFile(bytes.data(), bytes.size(), "test");
  EXPECT_EQ(out.size(), in.size());
  for (size_t i = 0; i < in.size(); i++) {
    EXPECT_EQ(out[i].id, in[i].id);
    EXPECT(out[i].data == in[i].data);
  }
  EXPECT(FindSection(out, kSectionVm) != nullptr);
  EXPECT(FindSection(out, 0x9999) == nullptr);
}

TEST_CASE("snapshot: a state file truncated at any length is refused") {
  auto bytes = EncodeStateFile(SampleSections());
  for (size_t n = 0; n < bytes.size(); n++) {
    std::string m = SnapshotErrorOf([&] { DecodeStateFile(bytes.data(), n, "test"); });
    EXPECT(Contains(m, "truncated"));
  }
}

TEST_CASE("snapshot: every single flipped bit of a state file is refused") {
  auto bytes = EncodeStateFile(SampleSections());
  for (size_t i = 0; i < bytes.size(); i++) {
    for (int bit = 0; bit < 8; bit++) {
      auto copy = bytes;
      copy[i] ^= static_cast<uint8_t>(1u << bit);
      SnapshotErrorOf([&] { DecodeStateFile(copy.data(), copy.size(), "test"); });
    }
  }
}

TEST_CASE("snapshot: an unknown version, bad magic, trailing bytes, duplicated sections are refused with their reason") {
  auto bytes = EncodeStateFile(SampleSections());
  auto v = bytes;
  v[8] = 2;
  EXPECT(Contains(SnapshotErrorOf([&] { DecodeStateFile(v.data(), v.size(), "t"); }), "format version 2; this vmlet reads only version 1"));
  auto m = bytes;
  m[0] = 'X';
  EXPECT(Contains(SnapshotErrorOf([&] { DecodeStateFile(m.data(), m.size(), "t"); }), "bad magic"));
  auto t = bytes;
  t.push_back(0);
  EXPECT(Contains(SnapshotErrorOf([&] { DecodeStateFile(t.data(), t.size(), "t"); }), "after the recorded end"));
  auto dup = SampleSections();
  dup.push_back(dup[0]);
  auto d = EncodeStateFile(dup);
  EXPECT(Contains(SnapshotErrorOf([&] { DecodeStateFile(d.data(), d.size(), "t"); }), "appears twice"));
}

TEST_CASE("snapshot: the section reader never reads past its section") {
  Writer w;
  w.U32(7);
  w.Bytes("abc", 3);
  Reader ok(w.data().data(), w.data().size(), "s");
  EXPECT_EQ(ok.U32(), 7u);
  EXPECT(ok.Str() == "abc");
  ok.ExpectEnd();
  // A length prefix claiming more than the section holds.
  Writer lie;
  lie.U64(1ull << 40);
  Reader r1(lie.data().data(), lie.data().size(), "s");
  EXPECT(Contains(SnapshotErrorOf([&] { r1.Bytes(); }), "runs past the section"));
  // A kernel struct of another size (another vmlet's layout).
  Writer small;
  small.Bytes("0123", 4);
  Reader r2(small.data().data(), small.data().size(), "s");
  kvm_regs regs{};
  EXPECT(Contains(SnapshotErrorOf([&] { r2.Struct(&regs); }), "expects"));
  Reader r3(w.data().data(), w.data().size(), "s");
  r3.U32();
  EXPECT(Contains(SnapshotErrorOf([&] { r3.ExpectEnd(); }), "unread bytes"));
  uint8_t two = 2;
  Reader r4(&two, 1, "s");
  SnapshotErrorOf([&] { r4.Bool(); });
}

TEST_CASE("snapshot: vCPU state encodes and decodes exactly") {
  VcpuState s;
  s.regs.rip = 0x1234567;
  s.regs.rflags = 0x202;
  s.sregs.cr3 = 0x9000;
  s.xsave.assign(4096, 0);
  s.xsave[100] = 0x5a;
  s.has_xcrs = true;
  s.xcrs.nr_xcrs = 1;
  s.xcrs.xcrs[0].value = 7;
  s.lapic.regs[0x20] = 1;
  for (uint32_t i : {0x10u, 0x6e0u, 0xc0000080u}) s.msrs.push_back(kvm_msr_entry{i, 0, i * 3ull});
  s.events.nmi.pending = 1;
  s.tsc_khz = 2400000;
  Writer w;
  s.Encode(w);
  Reader r(w.data().data(), w.data().size(), "vCPU 0");
  VcpuState b = VcpuState::Decode(r);
  EXPECT_EQ(b.regs.rip, s.regs.rip);
  EXPECT_EQ(b.sregs.cr3, s.sregs.cr3);
  EXPECT(b.xsave == s.xsave);
  EXPECT_EQ(b.xcrs.xcrs[0].value, 7ull);
  EXPECT_EQ(b.lapic.regs[0x20], 1);
  EXPECT_EQ(b.msrs.size(), 3u);
  EXPECT_EQ(b.msrs[2].data, 0xc0000080ull * 3);
  EXPECT_EQ(b.events.nmi.pending, 1);
  EXPECT_EQ(b.tsc_khz, 2400000u);
  // Cut anywhere, it is refused rather than half-read.
  for (size_t n = 0; n + 1 < w.data().size(); n += 97) {
    Reader cut(w.data().data(), n, "vCPU 0");
    SnapshotErrorOf([&] { VcpuState::Decode(cut); });
  }
}

TEST_CASE("snapshot: a fingerprint of another CPU or KVM is refused, naming both") {
  HostFingerprint a;
  a.cpuid_sha256 = std::string(64, 'a');
  a.vendor = "AuthenticAMD";
  a.family_model = 0xa10f11;
  a.xsave_bytes = 4096;
  HostFingerprint b = a;
  a.CheckSame(b);
  b.cpuid_sha256 = std::string(64, 'b');
  b.vendor = "GenuineIntel";
  std::string m = SnapshotErrorOf([&] { a.CheckSame(b); });
  EXPECT(Contains(m, "another CPU"));
  EXPECT(Contains(m, "GenuineIntel"));
  EXPECT(Contains(m, "AuthenticAMD"));
  HostFingerprint c = a;
  c.xsave_bytes = 8192;
  EXPECT(Contains(SnapshotErrorOf([&] { a.CheckSame(c); }), "other save areas"));
  Writer w;
  a.Encode(w);
  Reader r(w.data().data(), w.data().size(), "host");
  HostFingerprint back = HostFingerprint::Decode(r);
  back.CheckSame(a);
}

TEST_CASE("snapshot: sections the config does not account for, or missing ones, are refused") {
  SnapshotConfig c;
  c.memory_bytes = 2 << 20;
  c.cpus = 1;
  c.kernel.path = "/k";
  c.regions.push_back({0, 2 << 20, 0});
  c.memory_file_bytes = 2 << 20;
  auto sections = [&](bool with_vcpu, bool extra) {
    std::vector<Section> s;
    Writer cw, hw, vw, cpu;
    c.Encode(cw);
    HostFingerprint{}.Encode(hw);
    VmState vm;
    vm.pic_master.chip_id = KVM_IRQCHIP_PIC_MASTER;
    vm.pic_slave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    vm.ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
    vm.Encode(vw);
    VcpuState{}.Encode(cpu);
    s.push_back({kSectionConfig, cw.data()});
    s.push_back({kSectionHost, hw.data()});
    s.push_back({kSectionVm, vw.data()});
    if (with_vcpu) s.push_back({kSectionVcpu, cpu.data()});
    s.push_back({kSectionSerial, {}});
    s.push_back({kSectionRtc, {}});
    if (extra) s.push_back({0x7777, {1}});
    return s;
  };
  Image img = Image::FromSections(sections(true, false), "d");
  EXPECT_EQ(img.vcpus.size(), 1u);
  EXPECT(Contains(SnapshotErrorOf([&] { Image::FromSections(sections(false, false), "d"); }), "vCPU 0 section is missing"));
  EXPECT(Contains(SnapshotErrorOf([&] { Image::FromSections(sections(true, true), "d"); }), "sections where the config accounts for"));
}

TEST_CASE("snapshot: the memory file holds only non-zero pages, checks out, and maps back copy-on-write") {
  TempDir tmp;
  std::vector<std::pair<uint64_t, uint64_t>> layout{{0, 1 << 20}, {4ull << 30, 1 << 20}};
  GuestMemory mem(layout);
  const uint64_t a = 0x3000, b = (4ull << 30) + 0x7000;
  EXPECT(mem.WriteObj(a, uint64_t(0x1122334455667788)));
  EXPECT(mem.WriteObj(b + 4000, uint32_t(0xabcd)));
  // A page touched and zeroed again is data in the memfd but not in the file.
  EXPECT(mem.WriteObj(0x9000, uint64_t(1)));
  EXPECT(mem.WriteObj(0x9000, uint64_t(0)));
  std::string path = tmp.path + "/memory";
  MemoryFileInfo info = WriteMemoryFile(mem, path);
  EXPECT_EQ(info.logical_bytes, 2ull << 20);
  EXPECT_EQ(info.data_bytes, 2ull * 4096);
  EXPECT(info.allocated_bytes <= 64ull * 1024);  // sparse (filesystems allocate in blocks)
  EXPECT_EQ(MemoryFileCrc(path), info.crc);
  // Refuses to overwrite.
  SnapshotErrorOf([&] { WriteMemoryFile(mem, path); });

  GuestMemory restored(layout, GuestMemory::PrivateFile{path, {}});
  EXPECT(restored.private_file());
  EXPECT_EQ(restored.fd(), -1);
  uint64_t v = 0;
  uint32_t w = 0;
  EXPECT(restored.ReadObj(a, &v));
  EXPECT_EQ(v, 0x1122334455667788ull);
  EXPECT(restored.ReadObj(b + 4000, &w));
  EXPECT_EQ(w, 0xabcdu);
  EXPECT(restored.WriteObj(a, uint64_t(42)));
  // The guest's write stayed in its copy: the file, and a second mapping of it, still hold the snapshot.
  GuestMemory second(layout, GuestMemory::PrivateFile{path, {}});
  EXPECT(second.ReadObj(a, &v));
  EXPECT_EQ(v, 0x1122334455667788ull);
  EXPECT_EQ(MemoryFileCrc(path), info.crc);
  // A restored VM's RAM snapshots again (every page looked at): same content, same CRC.
  std::string again = tmp.path + "/memory2";
  MemoryFileInfo info2 = WriteMemoryFile(second, again);
  EXPECT_EQ(info2.crc, info.crc);
  // A memory file shorter than the layout is refused.
  EXPECT_EQ(truncate(again.c_str(), 1 << 20), 0);
  EXPECT_THROWS(GuestMemory(layout, GuestMemory::PrivateFile{again, {}}));
}

TEST_CASE("snapshot: anonymous RAM writes only its non-zero pages, the same file as memfd RAM, and never reads untouched pages") {
  TempDir tmp;
  const uint64_t high = 4ull << 30;
  std::vector<std::pair<uint64_t, uint64_t>> layout{{0, 16 << 20}, {high, 8 << 20}};
  GuestMemory anon(layout, RamBacking::Anonymous);
  GuestMemory memfd(layout, RamBacking::Memfd);
  EXPECT(anon.anonymous());
  const std::vector<uint64_t> written{0x0, 0x5000, (2ull << 20) - 4096, 2ull << 20, (16ull << 20) - 8, high + 0x10000,
                                      high + (8ull << 20) - 4096};
  uint64_t written_pages = 0;
  // Pages spread over both regions, a run across a 2 MiB boundary, the last
  // page of each region, and pages written then zeroed (populated, not data).
  auto both = [&](uint64_t gpa, uint64_t v) {
    EXPECT(anon.WriteObj(gpa, v));
    EXPECT(memfd.WriteObj(gpa, v));
  };
  for (uint64_t gpa : written) {
    both(gpa, gpa * 2654435761u + 1);
    written_pages++;
  }
  both(0x9000, 5);
  both(0x9000, 0);
  both(high + (3ull << 20), 9);
  both(high + (3ull << 20), 0);
  // 12 MiB in, untouched: 2 MiB frames away from any write, so no huge page covers it.
  const uint8_t* untouched = anon.regions()[0].host + (12ull << 20);
  EXPECT(!Resident(untouched));

  MemoryFileInfo a = WriteMemoryFile(anon, tmp.path + "/anon");
  MemoryFileInfo m = WriteMemoryFile(memfd, tmp.path + "/memfd");
  EXPECT_EQ(a.logical_bytes, 24ull << 20);
  EXPECT_EQ(a.data_bytes, written_pages * 4096);
  EXPECT_EQ(a.data_bytes, m.data_bytes);
  EXPECT_EQ(a.crc, m.crc);
  EXPECT_EQ(MemoryFileCrc(tmp.path + "/anon"), a.crc);
  EXPECT(a.allocated_bytes <= 512ull * 1024);  // sparse
  EXPECT(FileBytes(tmp.path + "/anon") == FileBytes(tmp.path + "/memfd"));
  EXPECT(!Resident(untouched));  // found without reading it

  // Restores like any snapshot: every written value back at its address.
  GuestMemory restored(layout, GuestMemory::PrivateFile{tmp.path + "/anon", {}});
  for (uint64_t gpa : written) {
    uint64_t v = 0;
    EXPECT(restored.ReadObj(gpa, &v));
    EXPECT_EQ(v, gpa * 2654435761u + 1);
  }
  uint64_t z = 1;
  EXPECT(restored.ReadObj(0x9000, &z));
  EXPECT_EQ(z, 0u);
}

namespace {

void WriteFilled(const std::string& path, size_t bytes, uint8_t seed) {
  std::string data(bytes, '\0');
  for (size_t i = 0; i < bytes; i += 4096) data[i] = static_cast<char>(seed + i / 4096);
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || write(fd, data.data(), data.size()) != static_cast<ssize_t>(data.size())) throw testing::Failure("write " + path);
  close(fd);
}

size_t MappingsOf(const std::string& dir) {
  std::string maps = FileBytes("/proc/self/maps");
  size_t n = 0;
  for (size_t at = maps.find(dir); at != std::string::npos; at = maps.find(dir, at + 1)) n++;
  return n;
}

std::string MemoryErrorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const VmmError& e) {
    if (e.kind() != ErrorKind::Memory) throw testing::Failure(std::string("wrong error kind: ") + e.what());
    return e.what();
  }
  throw testing::Failure("expected a VmmError(Memory)");
}

}  // namespace

TEST_CASE("snapshot: a memory overlay supplies its range's bytes, copy-on-write, 2 MiB-aligned; the rest comes from the memory file") {
  TempDir tmp;
  const uint64_t high = 4ull << 30;
  std::vector<std::pair<uint64_t, uint64_t>> layout{{0, 8 << 20}, {high, 4 << 20}};
  const std::string memory = tmp.path + "/memory", text = tmp.path + "/text", high_text = tmp.path + "/high";
  WriteFilled(memory, 12 << 20, 1);
  WriteFilled(text, 4 << 20, 101);
  WriteFilled(high_text, 2 << 20, 201);
  const std::string text_before = FileBytes(text);
  {
    GuestMemory m(layout, GuestMemory::PrivateFile{memory, {{2 << 20, text}, {high + (2 << 20), high_text}}});
    EXPECT_EQ(m.overlay_bytes(), 6ull << 20);
    for (auto& r : m.regions()) EXPECT_EQ(reinterpret_cast<uintptr_t>(r.host) % (2u << 20), 0u);
    uint8_t b = 0;
    // Page k of the memory file starts with 1 + k, of an overlay with its seed + k.
    EXPECT(m.ReadObj(0, &b) && b == 1);
    EXPECT(m.ReadObj((2 << 20) - 4096, &b) && b == uint8_t(1 + 511));
    EXPECT(m.ReadObj(2 << 20, &b) && b == 101);
    EXPECT(m.ReadObj((6 << 20) - 4096, &b) && b == uint8_t(101 + 1023));
    EXPECT(m.ReadObj(6 << 20, &b) && b == uint8_t(1 + 1536));
    EXPECT(m.ReadObj(high + (2 << 20), &b) && b == 201);
    EXPECT(m.ReadObj(high, &b) && b == uint8_t(1 + 2048));
    // The guest's write stays in its copy.
    EXPECT(m.WriteObj(2 << 20, uint8_t(0xee)));
    EXPECT(m.ReadObj(2 << 20, &b) && b == 0xee);
    EXPECT(MappingsOf(tmp.path) >= 4);
  }
  EXPECT(FileBytes(text) == text_before);
  EXPECT_EQ(MappingsOf(tmp.path), 0u);
}

TEST_CASE("snapshot: a memory overlay misaligned, of a partial 2 MiB, outside RAM, overlapping or missing is refused, nothing left mapped") {
  TempDir tmp;
  std::vector<std::pair<uint64_t, uint64_t>> layout{{0, 8 << 20}};
  const std::string memory = tmp.path + "/memory", two = tmp.path + "/two", odd = tmp.path + "/odd";
  WriteFilled(memory, 8 << 20, 1);
  WriteFilled(two, 2 << 20, 7);
  WriteFilled(odd, 3 << 20, 7);
  const std::string four = tmp.path + "/four";
  WriteFilled(four, 4 << 20, 7);
  auto refused = [&](std::vector<GuestMemory::Overlay> overlays, const char* says) {
    std::string why = MemoryErrorOf([&] { GuestMemory m(layout, GuestMemory::PrivateFile{memory, overlays}); });
    if (!Contains(why, says)) throw testing::Failure("'" + why + "' does not say '" + says + "'");
    EXPECT_EQ(MappingsOf(tmp.path), 0u);
  };
  refused({{1 << 20, two}}, "2 MiB-aligned address");
  refused({{2 << 20, odd}}, "whole 2 MiB");
  refused({{8 << 20, two}}, "not inside one RAM region");
  refused({{6 << 20, four}}, "not inside one RAM region");  // crosses the region's end
  refused({{2 << 20, two}, {2 << 20, two}}, "overlap");
  refused({{2 << 20, tmp.path + "/missing"}}, "missing");
  // The memory file itself missing, with a good overlay: refused, nothing mapped.
  std::string why = MemoryErrorOf([&] { GuestMemory m(layout, GuestMemory::PrivateFile{tmp.path + "/nomemory", {{2 << 20, two}}}); });
  EXPECT(Contains(why, "nomemory"));
}
