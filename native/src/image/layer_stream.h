// The uncompressed side of a layer blob: opens the file, sniffs or honours
// its compression, inflates it and hashes every uncompressed byte for the
// diff-id. Decompression and hashing run on their own thread, a few buffers
// ahead of the tar reader, so they overlap with squashfs compression.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "image/layer.h"

namespace vmlet::image {

class LayerStream {
 public:
  LayerStream(const std::string& path, LayerCompression compression, uint64_t max_bytes);
  ~LayerStream();
  LayerStream(const LayerStream&) = delete;
  LayerStream& operator=(const LayerStream&) = delete;

  // The next run of uncompressed bytes; size 0 at the end of the stream. The
  // bytes stay valid until the following call. Throws the producer's error.
  size_t Next(const uint8_t** data);

  // Reads (and hashes) whatever the tar reader left unread: the diff-id
  // covers the whole stream, including padding after the end-of-archive mark.
  void Drain();

  // Valid once Next() has returned 0.
  std::string DiffId() const { return diff_id_; }
  uint64_t bytes() const { return bytes_; }
  LayerCompression compression() const { return compression_; }

 private:
  struct Buffer {
    std::vector<uint8_t> bytes;
    size_t size = 0;
  };
  void Produce();
  void Stop();

  std::string path_;
  LayerCompression compression_;
  uint64_t max_bytes_;
  int fd_ = -1;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Buffer> ring_;
  size_t head_ = 0;      // next buffer the consumer takes
  size_t filled_ = 0;    // buffers ready for the consumer
  bool holding_ = false; // the consumer still uses ring_[head_ - 1]
  bool eof_ = false;
  bool stop_ = false;
  std::exception_ptr error_;
  std::string diff_id_;
  uint64_t bytes_ = 0;
  std::thread producer_;
};

}  // namespace vmlet::image
