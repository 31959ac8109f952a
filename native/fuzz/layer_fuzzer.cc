// libFuzzer target for the layer converter's input side: each input is a
// layer blob (plain tar, or gzip/zstd by its magic) converted to a throwaway
// image. A crash, a sanitizer report or an exception other than VmmError is
// a finding; VmmError(Image) is the expected refusal of a bad layer.
//
// Not part of `npm test` (open-ended); build and run with native/fuzz/run.sh.
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "image/layer.h"

namespace {

std::string ScratchDir() {
  static std::string dir = [] {
    char tmpl[] = "/tmp/vmlet-layer-fuzz-XXXXXX";
    if (!mkdtemp(tmpl)) std::abort();
    return std::string(tmpl);
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in = ScratchDir() + "/in";
  const std::string out = ScratchDir() + "/out.sqfs";
  int fd = ::open(in.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) std::abort();
  for (size_t off = 0; off < size;) {
    ssize_t n = ::write(fd, data + off, size - off);
    if (n <= 0) std::abort();
    off += static_cast<size_t>(n);
  }
  ::close(fd);
  vmlet::image::LayerOptions opts;
  opts.workers = 1;
  opts.durable = false;
  // Small limits keep each run fast; the limits themselves are under test too.
  opts.limits.max_bytes = 32 << 20;
  opts.limits.max_entries = 20000;
  try {
    vmlet::image::ConvertLayer(in, out, opts);
  } catch (const vmlet::VmmError& e) {
    if (e.kind() != vmlet::ErrorKind::Image) std::abort();
  }
  return 0;
}
