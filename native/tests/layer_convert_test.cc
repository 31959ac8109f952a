// The converter seen from C++: diff-ids, compressions, determinism and the
// all-or-nothing output. Listing fidelity is checked from TypeScript against
// squashfs-tools (test/unit/layer-fidelity.test.ts).
#include <string>

#include "core/error.h"
#include "image/layer.h"
#include "layer_corpus.h"
#include "testing.h"

using vmlet::ErrorKind;
using vmlet::VmmError;
using vmlet::image::ConvertLayer;
using vmlet::image::LayerCompression;
using vmlet::image::LayerOptions;
using namespace vmlet::testing;

namespace {

ErrorKind KindOf(const std::string& in, const std::string& out, const LayerOptions& opts, std::string* message = nullptr) {
  try {
    ConvertLayer(in, out, opts);
  } catch (const VmmError& e) {
    if (message) *message = e.what();
    return e.kind();
  }
  throw Failure("conversion of " + in + " succeeded; expected an error");
}

bool NoTemporaries(const ScratchDir& d) {
  for (auto& n : d.List()) {
    if (n.find(".tmp-") != std::string::npos) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("layer: diff-id is the SHA-256 of the uncompressed tar for gzip, zstd and plain blobs") {
  ScratchDir d;
  size_t entries = 0;
  std::string tar = CorpusTar(&entries);
  std::string want = "sha256:" + Sha256Hex(tar);
  WriteFile(d / "l.tar", tar);
  WriteFile(d / "l.tar.gz", Gzip(tar));
  WriteFile(d / "l.tar.zst", Zstd(tar));
  LayerOptions opts;
  auto plain = ConvertLayer(d / "l.tar", d / "plain.sqfs", opts);
  auto gz = ConvertLayer(d / "l.tar.gz", d / "gz.sqfs", opts);
  opts.compression = LayerCompression::Zstd;
  auto zs = ConvertLayer(d / "l.tar.zst", d / "zs.sqfs", opts);
  EXPECT(plain.diff_id == want);
  EXPECT(gz.diff_id == want);
  EXPECT(zs.diff_id == want);
  EXPECT_EQ(plain.tar_bytes, tar.size());
  EXPECT_EQ(gz.tar_bytes, tar.size());
  EXPECT_EQ(plain.entries, uint64_t{entries});
  EXPECT(ReadFile(d / "plain.sqfs") == ReadFile(d / "gz.sqfs"));
  EXPECT(ReadFile(d / "plain.sqfs") == ReadFile(d / "zs.sqfs"));
  EXPECT_EQ(plain.squashfs_bytes, ReadFile(d / "plain.sqfs").size());
  EXPECT(NoTemporaries(d));
}

TEST_CASE("layer: concatenated gzip members are one stream") {
  ScratchDir d;
  std::string tar = CorpusTar();
  size_t cut = tar.size() / 3;
  WriteFile(d / "multi.gz", Gzip(tar.substr(0, cut), 1) + Gzip(tar.substr(cut), 9));
  auto r = ConvertLayer(d / "multi.gz", d / "out.sqfs", LayerOptions{});
  EXPECT(r.diff_id == "sha256:" + Sha256Hex(tar));
}

TEST_CASE("layer: same input gives the same bytes across runs and worker counts") {
  ScratchDir d;
  WriteFile(d / "l.tar", CorpusTar());
  std::string first;
  for (unsigned workers : {1u, 2u, 4u, 1u}) {
    LayerOptions opts;
    opts.workers = workers;
    ConvertLayer(d / "l.tar", d / "out.sqfs", opts);
    std::string img = ReadFile(d / "out.sqfs");
    if (first.empty()) first = img;
    EXPECT(img == first);
  }
}

TEST_CASE("layer: block size is honoured and validated") {
  ScratchDir d;
  WriteFile(d / "l.tar", CorpusTar());
  LayerOptions opts;
  opts.block_size = 4096;
  ConvertLayer(d / "l.tar", d / "small.sqfs", opts);
  std::string img = ReadFile(d / "small.sqfs");
  // Super block: block_size is the u32 at offset 12, little-endian.
  uint32_t bs = static_cast<uint8_t>(img[12]) | static_cast<uint8_t>(img[13]) << 8 |
                static_cast<uint8_t>(img[14]) << 16 | static_cast<uint32_t>(static_cast<uint8_t>(img[15])) << 24;
  EXPECT_EQ(bs, 4096u);
  opts.block_size = 3000;
  EXPECT(KindOf(d / "l.tar", d / "bad.sqfs", opts) == ErrorKind::InvalidArgument);
  EXPECT(!Exists(d / "bad.sqfs"));
  EXPECT(NoTemporaries(d));
}

TEST_CASE("layer: garbage after the last gzip member is corrupt data") {
  ScratchDir d;
  WriteFile(d / "l.gz", Gzip(CorpusTar()) + "trailing junk that is not a gzip member");
  std::string msg;
  EXPECT(KindOf(d / "l.gz", d / "out.sqfs", LayerOptions{}, &msg) == ErrorKind::Image);
  EXPECT(msg.find("corrupt gzip data") != std::string::npos);
  EXPECT(!Exists(d / "out.sqfs"));
  EXPECT(NoTemporaries(d));
}

TEST_CASE("layer: a truncated zstd blob is refused") {
  ScratchDir d;
  std::string z = Zstd(CorpusTar());
  WriteFile(d / "l.zst", z.substr(0, z.size() - 10));
  std::string msg;
  EXPECT(KindOf(d / "l.zst", d / "out.sqfs", LayerOptions{}, &msg) == ErrorKind::Image);
  EXPECT(msg.find("truncated zstd stream") != std::string::npos);
  EXPECT(NoTemporaries(d));
}

TEST_CASE("layer: an output directory that does not exist is an error, not a crash") {
  ScratchDir d;
  WriteFile(d / "l.tar", CorpusTar());
  std::string msg;
  EXPECT(KindOf(d / "l.tar", d / "missing/dir/out.sqfs", LayerOptions{}, &msg) == ErrorKind::Image);
  EXPECT(msg.find("missing/dir/out.sqfs") != std::string::npos);
}
