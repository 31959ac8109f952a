// Layer conversion: an OCI layer blob (a tar, gzip- or zstd-compressed or
// plain) streamed straight into a squashfs image, never extracted onto the
// host. The one entry point the addon and the CLI driver use.
#pragma once
#include <cstdint>
#include <string>

namespace vmlet::image {

enum class LayerCompression { Auto, Gzip, Zstd, None };

// Bounds that stop a hostile layer (a "tar bomb") from filling the disk or
// memory: the uncompressed stream, the bytes its files expand to (sparse
// files count at their full size), the number of entries, and path lengths.
struct LayerLimits {
  uint64_t max_bytes = uint64_t{64} << 30;
  uint64_t max_entries = 2'000'000;
  uint32_t max_path_length = 4096;
};

struct LayerOptions {
  LayerCompression compression = LayerCompression::Auto;
  LayerLimits limits;
  uint32_t block_size = 128 * 1024;
  // zstd level; 0 = libsquashfs' default (15, as tar2sqfs and mksquashfs).
  unsigned compression_level = 0;
  // Compression workers; 0 = one per CPU. Output bytes do not depend on it.
  unsigned workers = 0;
  // fsync the image and its directory before returning, so a stored layer
  // survives a crash. Only tests that convert thousands of throwaway mutants
  // turn it off.
  bool durable = true;
};

struct LayerConversion {
  std::string diff_id;       // "sha256:<hex>" of the whole uncompressed tar stream
  uint64_t entries = 0;      // tar entries consumed
  uint64_t tar_bytes = 0;    // uncompressed stream bytes
  uint64_t squashfs_bytes = 0;
};

// Writes `output` via `<output>.tmp-<pid>` and a rename, so a reader never
// sees a half-written image; on any failure nothing is left behind. Throws
// VmmError(ErrorKind::Image) naming the entry and what is wrong with it.
LayerConversion ConvertLayer(const std::string& input, const std::string& output, const LayerOptions& options);

LayerCompression ParseLayerCompression(const std::string& name);

}  // namespace vmlet::image
