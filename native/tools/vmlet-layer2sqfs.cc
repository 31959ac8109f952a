// vmlet-layer2sqfs: converts one layer blob to a squashfs image with the same
// code the addon uses. For the benchmark (hack/bench/layer.bench.ts), for
// fuzzing by hand, and for looking at a layer without node.
//
//   vmlet-layer2sqfs [--compression auto|gzip|zstd|none] [--block-size N]
//                    [--level N] [--workers N] [--max-bytes N] [--max-entries N]
//                    [--max-path-length N] <layer blob> <output.sqfs>
//
// Prints one JSON line with the conversion's figures; on failure prints the
// error to stderr and exits 1 (2 for bad usage).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "image/layer.h"

namespace {

[[noreturn]] void Usage(const char* why) {
  std::fprintf(stderr,
               "vmlet-layer2sqfs: %s\n"
               "usage: vmlet-layer2sqfs [--compression auto|gzip|zstd|none] [--block-size N] [--level N] [--workers N]\n"
               "                        [--max-bytes N] [--max-entries N] [--max-path-length N] <layer> <out.sqfs>\n",
               why);
  std::exit(2);
}

uint64_t Number(const char* flag, const char* s) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s, &end, 10);
  if (errno != 0 || !end || *end != '\0' || *s == '-' || *s == '\0') Usage((std::string(flag) + " needs a non-negative integer").c_str());
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  vmlet::image::LayerOptions opts;
  const char* input = nullptr;
  const char* output = nullptr;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto value = [&]() -> const char* {
        if (i + 1 >= argc) Usage((a + " needs a value").c_str());
        return argv[++i];
      };
      if (a == "--compression") opts.compression = vmlet::image::ParseLayerCompression(value());
      else if (a == "--block-size") opts.block_size = static_cast<uint32_t>(Number("--block-size", value()));
      else if (a == "--level") opts.compression_level = static_cast<unsigned>(Number("--level", value()));
      else if (a == "--workers") opts.workers = static_cast<unsigned>(Number("--workers", value()));
      else if (a == "--max-bytes") opts.limits.max_bytes = Number("--max-bytes", value());
      else if (a == "--max-entries") opts.limits.max_entries = Number("--max-entries", value());
      else if (a == "--max-path-length") opts.limits.max_path_length = static_cast<uint32_t>(Number("--max-path-length", value()));
      else if (a.rfind("--", 0) == 0) Usage(("unknown option " + a).c_str());
      else if (!input) input = argv[i];
      else if (!output) output = argv[i];
      else Usage("too many arguments");
    }
    if (!input || !output) Usage("a layer blob and an output path are required");
    auto r = vmlet::image::ConvertLayer(input, output, opts);
    std::printf("{\"diffId\":\"%s\",\"entries\":%llu,\"tarBytes\":%llu,\"squashfsBytes\":%llu}\n", r.diff_id.c_str(),
                static_cast<unsigned long long>(r.entries), static_cast<unsigned long long>(r.tar_bytes),
                static_cast<unsigned long long>(r.squashfs_bytes));
    return 0;
  } catch (const vmlet::VmmError& e) {
    std::fprintf(stderr, "vmlet-layer2sqfs: %s: %s\n", vmlet::ErrorKindName(e.kind()), e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vmlet-layer2sqfs: %s\n", e.what());
    return 1;
  }
}
