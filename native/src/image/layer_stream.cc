#include "image/layer_stream.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <cstring>
#include <memory>

#include "core/error.h"

namespace vmlet::image {

namespace {

constexpr size_t kBufferSize = 1 << 20;
constexpr size_t kRingSize = 4;

VmmError StreamError(const std::string& path, const std::string& detail, int err = 0) {
  return VmmError(ErrorKind::Image, "read layer " + path, detail, err);
}

const char* CompressionName(LayerCompression c) {
  switch (c) {
    case LayerCompression::Gzip: return "gzip";
    case LayerCompression::Zstd: return "zstd";
    case LayerCompression::None: return "none";
    case LayerCompression::Auto: return "auto";
  }
  return "?";
}

// Reads the compressed file in large chunks; EINTR is retried because the
// addon runs inside node, whose signal handlers may interrupt us.
class RawInput {
 public:
  RawInput(int fd, const std::string& path) : fd_(fd), path_(path), buf_(kBufferSize) {}
  // Refills when empty; returns false at end of file.
  bool Fill() {
    if (pos_ < len_) return true;
    for (;;) {
      ssize_t n = ::read(fd_, buf_.data(), buf_.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw SysError(ErrorKind::Image, "read layer " + path_);
      pos_ = 0;
      len_ = static_cast<size_t>(n);
      return n > 0;
    }
  }
  const uint8_t* data() const { return buf_.data() + pos_; }
  size_t available() const { return len_ - pos_; }
  void Consume(size_t n) { pos_ += n; }

 private:
  int fd_;
  const std::string& path_;
  std::vector<uint8_t> buf_;
  size_t pos_ = 0;
  size_t len_ = 0;
};

// One decoder per compression; Decode() fills `out` as far as it can and
// returns 0 only at the end of the stream.
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual size_t Decode(uint8_t* out, size_t cap) = 0;
};

class PlainDecoder : public Decoder {
 public:
  explicit PlainDecoder(RawInput& in) : in_(in) {}
  size_t Decode(uint8_t* out, size_t cap) override {
    size_t n = 0;
    while (n < cap && in_.Fill()) {
      size_t k = std::min(cap - n, in_.available());
      std::memcpy(out + n, in_.data(), k);
      in_.Consume(k);
      n += k;
    }
    return n;
  }

 private:
  RawInput& in_;
};

class GzipDecoder : public Decoder {
 public:
  GzipDecoder(RawInput& in, const std::string& path) : in_(in), path_(path) {
    std::memset(&z_, 0, sizeof z_);
    // 16 + MAX_WBITS: gzip framing only; a zlib or raw deflate stream is not a layer.
    if (inflateInit2(&z_, 16 + MAX_WBITS) != Z_OK) throw StreamError(path_, "cannot initialise zlib");
  }
  ~GzipDecoder() override { inflateEnd(&z_); }
  size_t Decode(uint8_t* out, size_t cap) override {
    z_.next_out = out;
    z_.avail_out = static_cast<uInt>(cap);
    while (z_.avail_out > 0) {
      if (member_done_) {
        // Concatenated gzip members are one stream (RFC 1952 2.2); anything
        // after the last member must itself be a member.
        if (!in_.Fill()) break;
        inflateReset(&z_);
        member_done_ = false;
      }
      if (!in_.Fill()) {
        throw StreamError(path_, "truncated gzip stream: the blob ends before the end of the compressed data; "
                                 "re-download the layer");
      }
      z_.next_in = const_cast<Bytef*>(in_.data());
      z_.avail_in = static_cast<uInt>(in_.available());
      int rc = inflate(&z_, Z_NO_FLUSH);
      in_.Consume(in_.available() - z_.avail_in);
      if (rc == Z_STREAM_END) {
        member_done_ = true;
      } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
        throw StreamError(path_, std::string("corrupt gzip data (") + (z_.msg ? z_.msg : "zlib error " + std::to_string(rc)) +
                                     "); the blob is damaged or not gzip: re-download it or pass the right compression");
      }
    }
    return cap - z_.avail_out;
  }

 private:
  RawInput& in_;
  const std::string& path_;
  z_stream z_;
  bool member_done_ = false;
};

class ZstdDecoder : public Decoder {
 public:
  ZstdDecoder(RawInput& in, const std::string& path) : in_(in), path_(path), ctx_(ZSTD_createDCtx()) {
    if (!ctx_) throw StreamError(path_, "cannot create a zstd decompression context");
  }
  ~ZstdDecoder() override { ZSTD_freeDCtx(ctx_); }
  size_t Decode(uint8_t* out, size_t cap) override {
    ZSTD_outBuffer ob{out, cap, 0};
    while (ob.pos < ob.size) {
      if (!in_.Fill()) {
        if (pending_ != 0) {
          throw StreamError(path_, "truncated zstd stream: the blob ends inside a frame; re-download the layer");
        }
        break;
      }
      ZSTD_inBuffer ib{in_.data(), in_.available(), 0};
      size_t rc = ZSTD_decompressStream(ctx_, &ob, &ib);
      in_.Consume(ib.pos);
      if (ZSTD_isError(rc)) {
        throw StreamError(path_, std::string("corrupt zstd data (") + ZSTD_getErrorName(rc) +
                                     "); the blob is damaged or not zstd: re-download it or pass the right compression");
      }
      pending_ = rc;
    }
    return ob.pos;
  }

 private:
  RawInput& in_;
  const std::string& path_;
  ZSTD_DCtx* ctx_;
  size_t pending_ = 0;
};

LayerCompression Sniff(const uint8_t* p, size_t n) {
  if (n >= 2 && p[0] == 0x1f && p[1] == 0x8b) return LayerCompression::Gzip;
  if (n >= 4 && p[0] == 0x28 && p[1] == 0xb5 && p[2] == 0x2f && p[3] == 0xfd) return LayerCompression::Zstd;
  return LayerCompression::None;
}

}  // namespace

LayerStream::LayerStream(const std::string& path, LayerCompression compression, uint64_t max_bytes)
    : path_(path), compression_(compression), max_bytes_(max_bytes), ring_(kRingSize) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw SysError(ErrorKind::Image, "open layer " + path, "check that the blob exists and is readable");
  uint8_t magic[4];
  ssize_t n;
  do n = ::pread(fd_, magic, sizeof magic, 0); while (n < 0 && errno == EINTR);
  if (n < 0) {
    int e = errno;
    ::close(fd_);
    throw VmmError(ErrorKind::Image, "read layer " + path, "", e);
  }
  LayerCompression sniffed = Sniff(magic, static_cast<size_t>(n));
  if (compression_ == LayerCompression::Auto) {
    compression_ = sniffed;
  } else if (sniffed != LayerCompression::None && sniffed != compression_) {
    ::close(fd_);
    throw StreamError(path, std::string("the blob is ") + CompressionName(sniffed) + "-compressed but compression '" +
                                CompressionName(compression_) + "' was asked; pass 'auto' or the layer's media type");
  }
  for (auto& b : ring_) b.bytes.resize(kBufferSize);
  producer_ = std::thread([this] { Produce(); });
}

LayerStream::~LayerStream() {
  Stop();
  if (fd_ >= 0) ::close(fd_);
}

void LayerStream::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (producer_.joinable()) producer_.join();
}

void LayerStream::Produce() {
  try {
    RawInput raw(fd_, path_);
    std::unique_ptr<Decoder> dec;
    switch (compression_) {
      case LayerCompression::Gzip: dec = std::make_unique<GzipDecoder>(raw, path_); break;
      case LayerCompression::Zstd: dec = std::make_unique<ZstdDecoder>(raw, path_); break;
      default: dec = std::make_unique<PlainDecoder>(raw); break;
    }
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> md(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    if (!md || EVP_DigestInit_ex(md.get(), EVP_sha256(), nullptr) != 1) throw StreamError(path_, "cannot initialise SHA-256");
    uint64_t total = 0;
    for (;;) {
      size_t slot;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || filled_ + (holding_ ? 1 : 0) < ring_.size(); });
        if (stop_) return;
        slot = (head_ + filled_) % ring_.size();
      }
      Buffer& b = ring_[slot];
      b.size = dec->Decode(b.bytes.data(), b.bytes.size());
      total += b.size;
      if (total > max_bytes_) {
        throw StreamError(path_, "tar bomb: the uncompressed layer exceeds the limit of " + std::to_string(max_bytes_) +
                                     " bytes (maxBytes); raise the limit if the layer is trusted");
      }
      if (b.size > 0 && EVP_DigestUpdate(md.get(), b.bytes.data(), b.size) != 1) throw StreamError(path_, "SHA-256 failed");
      std::string digest;
      if (b.size == 0) {
        unsigned char out[EVP_MAX_MD_SIZE];
        unsigned int len = 0;
        if (EVP_DigestFinal_ex(md.get(), out, &len) != 1) throw StreamError(path_, "SHA-256 failed");
        static const char* hex = "0123456789abcdef";
        digest = "sha256:";
        for (unsigned i = 0; i < len; ++i) {
          digest += hex[out[i] >> 4];
          digest += hex[out[i] & 15];
        }
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++filled_;
        if (b.size == 0) {
          diff_id_ = digest;
          bytes_ = total;
        }
      }
      cv_.notify_all();
      if (b.size == 0) return;
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::current_exception();
    cv_.notify_all();
  }
}

size_t LayerStream::Next(const uint8_t** data) {
  std::unique_lock<std::mutex> lock(mu_);
  if (holding_) {
    holding_ = false;
    cv_.notify_all();
  }
  if (eof_) {
    *data = nullptr;
    return 0;
  }
  cv_.wait(lock, [&] { return filled_ > 0 || error_; });
  if (filled_ == 0 && error_) std::rethrow_exception(error_);
  Buffer& b = ring_[head_];
  head_ = (head_ + 1) % ring_.size();
  --filled_;
  if (b.size == 0) {
    eof_ = true;
    *data = nullptr;
    return 0;
  }
  holding_ = true;
  *data = b.bytes.data();
  return b.size;
}

void LayerStream::Drain() {
  const uint8_t* p;
  while (Next(&p) > 0) {
  }
}

}  // namespace vmlet::image
