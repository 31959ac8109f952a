// A bounded, deterministic mutation loop over the corpus tars: every mutant
// either converts or fails with an ImageError; nothing crashes, hangs or
// leaves a temporary file. Runs under `npm test`; a libFuzzer target for
// open-ended fuzzing is left for later (see the report).
#include <cstdint>
#include <string>

#include "core/error.h"
#include "image/layer.h"
#include "layer_corpus.h"
#include "testing.h"

using namespace vmlet::testing;

namespace {

// xorshift64*: deterministic across platforms and runs, unlike std::rand.
struct Rng {
  uint64_t s;
  uint64_t Next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
  size_t Below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(Next() % n); }
};

std::string Mutate(const std::string& seed, Rng& rng) {
  std::string m = seed;
  switch (rng.Below(7)) {
    case 0:  // flip a few bytes anywhere
      for (size_t i = 0, n = 1 + rng.Below(8); i < n; ++i) m[rng.Below(m.size())] ^= static_cast<char>(1 + rng.Below(255));
      break;
    case 1: {  // scribble on one header's numeric fields (mode..mtime, size, devices)
      size_t hdr = rng.Below(m.size() / 512) * 512;
      size_t field = hdr + 100 + rng.Below(60);
      for (size_t i = 0; i < 12 && field + i < m.size(); ++i) m[field + i] = "0123456777 \0x-"[rng.Below(14)];
      break;
    }
    case 2:  // truncate
      m.resize(rng.Below(m.size()));
      break;
    case 3: {  // duplicate a run of blocks (repeated headers, data parsed as headers)
      size_t from = rng.Below(m.size() / 512) * 512;
      size_t len = 512 * (1 + rng.Below(4));
      m.insert(rng.Below(m.size() / 512) * 512, m.substr(from, len));
      break;
    }
    case 4: {  // typeflag and name of one header
      size_t hdr = rng.Below(m.size() / 512) * 512;
      if (hdr + 156 < m.size()) m[hdr + 156] = "0123456789gxLKSDAVM\0"[rng.Below(20)];
      if (rng.Below(2)) m.replace(hdr, 3, "../");
      break;
    }
    case 5: {  // random bytes inserted
      std::string junk(1 + rng.Below(600), '\0');
      for (auto& c : junk) c = static_cast<char>(rng.Next());
      m.insert(rng.Below(m.size()), junk);
      break;
    }
    default: {  // a PAX record rewritten
      size_t at = m.find("path=");
      if (at != std::string::npos) m.replace(at, 5, rng.Below(2) ? "size=" : "linkpath=");
      size_t s = m.find("SCHILY");
      if (s != std::string::npos) m[s + rng.Below(20)] = static_cast<char>(rng.Next());
      break;
    }
  }
  return m;
}

void RunMutants(const std::string& seed, uint64_t rng_seed, int iterations, bool gzip) {
  ScratchDir d;
  Rng rng{rng_seed};
  vmlet::image::LayerOptions opts;
  opts.workers = 1;
  opts.durable = false;
  opts.limits.max_bytes = 64 << 20;
  opts.limits.max_entries = 10000;
  int converted = 0, refused = 0;
  for (int i = 0; i < iterations; ++i) {
    std::string mutant = Mutate(seed, rng);
    WriteFile(d / "in", gzip ? Gzip(mutant) : mutant);
    try {
      vmlet::image::ConvertLayer(d / "in", d / "out.sqfs", opts);
      ++converted;
    } catch (const vmlet::VmmError& e) {
      if (e.kind() != vmlet::ErrorKind::Image) throw Failure("mutant " + std::to_string(i) + ": non-image error " + e.what());
      ++refused;
    }
    for (auto& n : d.List()) {
      if (n.find(".tmp-") != std::string::npos) throw Failure("mutant " + std::to_string(i) + " left " + n);
    }
  }
  // The loop must exercise both outcomes, or the mutations are too weak or too strong.
  EXPECT(converted > 0);
  EXPECT(refused > 0);
}

}  // namespace

TEST_CASE("layer fuzz: 400 mutated plain tars convert or fail with ImageError") {
  RunMutants(CorpusTar(), 0x766d6c6574ull, 400, false);
}

TEST_CASE("layer fuzz: 80 mutated tars inside gzip convert or fail with ImageError") {
  RunMutants(CorpusTar(), 0x6c61796572ull, 80, true);
}

TEST_CASE("layer fuzz: 150 mutated gzip streams fail cleanly") {
  ScratchDir d;
  std::string gz = Gzip(CorpusTar());
  Rng rng{42};
  vmlet::image::LayerOptions opts;
  opts.workers = 1;
  opts.durable = false;
  int refused = 0;
  for (int i = 0; i < 150; ++i) {
    std::string m = gz;
    for (size_t k = 0, n = 1 + rng.Below(4); k < n; ++k) m[10 + rng.Below(m.size() - 10)] ^= static_cast<char>(1 + rng.Below(255));
    WriteFile(d / "in.gz", m);
    try {
      vmlet::image::ConvertLayer(d / "in.gz", d / "out.sqfs", opts);
    } catch (const vmlet::VmmError& e) {
      if (e.kind() != vmlet::ErrorKind::Image) throw Failure(std::string("non-image error ") + e.what());
      ++refused;
    }
  }
  EXPECT(refused > 0);
}
