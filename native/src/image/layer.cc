// Tar reading (libarchive, fed from LayerStream through a callback) and the
// layer semantics: path normalisation, hardlinks, OCI whiteouts, last entry
// wins, implicit parents, limits. The squashfs side is SquashfsWriter.
#include "image/layer.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <locale.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <vector>

#include "core/error.h"
#include "image/layer_stream.h"
#include "image/squashfs_writer.h"

namespace vmlet::image {

namespace {

constexpr const char* kWhiteoutPrefix = ".wh.";
constexpr const char* kOpaqueMarker = ".wh..wh..opq";
constexpr const char* kOpaqueXattr = "trusted.overlay.opaque";

// libarchive converts pax (UTF-8) names to the thread's locale; under the
// "C" locale non-ASCII names would fail to convert. A UTF-8 locale for this
// thread only keeps the bytes as they are without touching node's globals.
class Utf8LocaleScope {
 public:
  Utf8LocaleScope() {
    loc_ = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(0));
    if (loc_) prev_ = uselocale(loc_);
  }
  ~Utf8LocaleScope() {
    if (loc_) {
      uselocale(prev_);
      freelocale(loc_);
    }
  }

 private:
  locale_t loc_ = static_cast<locale_t>(0);
  locale_t prev_ = static_cast<locale_t>(0);
};

struct ArchiveDeleter {
  void operator()(archive* a) const { archive_read_free(a); }
};

struct ReadContext {
  LayerStream* stream;
  std::exception_ptr error;
};

la_ssize_t ReadCallback(archive*, void* client, const void** buffer) {
  auto* ctx = static_cast<ReadContext*>(client);
  try {
    const uint8_t* p = nullptr;
    size_t n = ctx->stream->Next(&p);
    *buffer = p;
    return static_cast<la_ssize_t>(n);
  } catch (...) {
    // Exceptions must not unwind through libarchive's C frames.
    ctx->error = std::current_exception();
    return -1;
  }
}

std::string Quote(const std::string& s) { return "'" + s + "'"; }

// Squashfs (via the kernel) stores these three namespaces only.
bool StorableXattr(const std::string& name) {
  return name.rfind("user.", 0) == 0 || name.rfind("trusted.", 0) == 0 || name.rfind("security.", 0) == 0;
}

class LayerConverter {
 public:
  LayerConverter(const std::string& input, const LayerOptions& opts, SquashfsWriter& writer)
      : input_(input), opts_(opts), writer_(writer), root_(std::make_shared<FsNode>()) {
    root_->mode = S_IFDIR | 0755;
  }

  FsNode& root() { return *root_; }
  uint64_t entries() const { return entries_; }

  void Run(LayerStream& stream) {
    std::unique_ptr<archive, ArchiveDeleter> a(archive_read_new());
    if (!a) throw Fail("", "cannot create a tar reader");
    // Tar only (ustar, pax, GNU); no libarchive filters: decompression is
    // LayerStream's, so the diff-id sees exactly the bytes the tar reader does.
    archive_read_support_format_tar(a.get());
    ReadContext ctx{&stream, nullptr};
    if (archive_read_open(a.get(), &ctx, nullptr, ReadCallback, nullptr) != ARCHIVE_OK) {
      RethrowStreamError(ctx);
      throw Fail("", std::string("not a tar archive: ") + ErrorString(a.get()));
    }
    for (;;) {
      archive_entry* e = nullptr;
      int rc = archive_read_next_header(a.get(), &e);
      if (rc == ARCHIVE_EOF) break;
      if (rc != ARCHIVE_OK && rc != ARCHIVE_WARN) {
        RethrowStreamError(ctx);
        throw Fail(current_.empty() ? "" : "after " + Quote(current_),
                   std::string("bad tar header: ") + ErrorString(a.get()) + "; the layer is damaged or truncated");
      }
      ++entries_;
      if (entries_ > opts_.limits.max_entries) {
        throw Fail("", "tar bomb: more than " + std::to_string(opts_.limits.max_entries) +
                           " entries (maxEntries); raise the limit if the layer is trusted");
      }
      const char* name = archive_entry_pathname(e);
      if (!name) throw Fail("entry #" + std::to_string(entries_), "its path cannot be decoded");
      current_ = name;
      Entry(a.get(), e, ctx);
    }
  }

 private:
  VmmError Fail(const std::string& where, const std::string& what) const {
    std::string op = "convert layer " + input_;
    if (!where.empty()) op += ": " + where;
    return VmmError(ErrorKind::Image, op, what);
  }
  VmmError EntryFail(const std::string& what) const { return Fail("entry " + Quote(current_), what); }

  static std::string ErrorString(archive* a) {
    const char* s = archive_error_string(a);
    return s ? s : "unknown libarchive error";
  }

  static void RethrowStreamError(ReadContext& ctx) {
    if (ctx.error) std::rethrow_exception(ctx.error);
  }

  void CheckLength(const std::string& s, const char* what) const {
    if (s.size() > opts_.limits.max_path_length) {
      throw EntryFail(std::string(what) + " is " + std::to_string(s.size()) + " bytes, over the limit of " +
                      std::to_string(opts_.limits.max_path_length) + " (maxPathLength)");
    }
  }

  // Lexical normalisation: leading "/" and "./" go, "." and empty
  // components vanish, ".." pops; a ".." that would climb above the layer's
  // root is refused rather than clamped, so nothing lands where the author
  // did not say.
  std::vector<std::string> Split(const std::string& raw, const char* what) const {
    CheckLength(raw, what);
    std::vector<std::string> parts;
    size_t i = 0;
    while (i <= raw.size()) {
      size_t j = raw.find('/', i);
      if (j == std::string::npos) j = raw.size();
      std::string c = raw.substr(i, j - i);
      i = j + 1;
      if (c.empty() || c == ".") continue;
      if (c == "..") {
        if (parts.empty()) {
          throw EntryFail(std::string(what) + " " + Quote(raw) + " climbs out of the layer's root with '..'; "
                          "the layer is malformed or hostile");
        }
        parts.pop_back();
        continue;
      }
      if (c.size() > 255) {
        throw EntryFail(std::string(what) + " has a component of " + std::to_string(c.size()) +
                        " bytes; names are limited to 255");
      }
      parts.push_back(std::move(c));
    }
    return parts;
  }

  // Walks to the directory holding parts[0..n), creating missing ones the
  // way tar extraction does (0755, root, mtime 0).
  FsNode& Parent(const std::vector<std::string>& parts, size_t n) {
    FsNode* dir = root_.get();
    for (size_t i = 0; i < n; ++i) {
      auto& slot = dir->children[parts[i]];
      if (!slot) {
        slot = std::make_shared<FsNode>();
        slot->mode = S_IFDIR | 0755;
      } else if (!slot->is_dir()) {
        throw EntryFail("its parent " + Quote(Join(parts, i + 1)) + " is not a directory in this layer");
      }
      dir = slot.get();
    }
    return *dir;
  }

  static std::string Join(const std::vector<std::string>& parts, size_t n) {
    std::string s;
    for (size_t i = 0; i < n; ++i) s += (i ? "/" : "") + parts[i];
    return s;
  }

  std::shared_ptr<FsNode> Lookup(const std::vector<std::string>& parts) {
    std::shared_ptr<FsNode> n = root_;
    for (auto& c : parts) {
      if (!n->is_dir()) return nullptr;
      auto it = n->children.find(c);
      if (it == n->children.end()) return nullptr;
      n = it->second;
    }
    return n;
  }

  void Place(const std::vector<std::string>& parts, std::shared_ptr<FsNode> node) {
    if (parts.empty()) {
      if (!node->is_dir()) throw EntryFail("the layer's root must be a directory");
      Refresh(*root_, *node);
      return;
    }
    FsNode& dir = Parent(parts, parts.size() - 1);
    auto& slot = dir.children[parts.back()];
    if (slot && slot->is_dir() && node->is_dir()) {
      // A directory entry repeated (or arriving after its children) updates
      // the directory; its contents stay, as tar extraction leaves them.
      Refresh(*slot, *node);
      return;
    }
    slot = std::move(node);
  }

  static void Refresh(FsNode& dir, const FsNode& from) {
    auto opaque = dir.xattrs.find(kOpaqueXattr);
    std::string keep = opaque != dir.xattrs.end() ? opaque->second : std::string();
    bool had_opaque = opaque != dir.xattrs.end();
    dir.mode = from.mode;
    dir.uid = from.uid;
    dir.gid = from.gid;
    dir.mtime = from.mtime;
    dir.xattrs = from.xattrs;
    if (had_opaque) dir.xattrs.emplace(kOpaqueXattr, keep);
  }

  void Metadata(archive_entry* e, FsNode& n) const {
    int64_t uid = archive_entry_uid(e), gid = archive_entry_gid(e);
    if (uid < 0 || uid > 0xFFFFFFFFll || gid < 0 || gid > 0xFFFFFFFFll) {
      throw EntryFail("uid " + std::to_string(uid) + " / gid " + std::to_string(gid) + " do not fit in 32 bits");
    }
    n.uid = static_cast<uint32_t>(uid);
    n.gid = static_cast<uint32_t>(gid);
    int64_t mtime = archive_entry_mtime(e);
    n.mtime = static_cast<uint32_t>(mtime < 0 ? 0 : mtime > 0xFFFFFFFFll ? 0xFFFFFFFFll : mtime);
    n.mode = archive_entry_perm(e) & 07777;
    archive_entry_xattr_reset(e);
    const char* name;
    const void* value;
    size_t size;
    while (archive_entry_xattr_next(e, &name, &value, &size) == ARCHIVE_OK) {
      std::string key(name);
      if (!StorableXattr(key)) {
        throw EntryFail("xattr " + Quote(key) + " is outside the user., trusted. and security. namespaces, "
                        "which are all squashfs can store");
      }
      n.xattrs[key] = std::string(static_cast<const char*>(value), size);
    }
  }

  void Entry(archive* a, archive_entry* e, ReadContext& ctx) {
    std::vector<std::string> parts = Split(current_, "path");
    const std::string base = parts.empty() ? std::string() : parts.back();

    if (base.rfind(kWhiteoutPrefix, 0) == 0) {
      Whiteout(e, parts, base);
      return;
    }

    if (const char* link = archive_entry_hardlink(e)) {
      std::vector<std::string> target = Split(link, "hardlink target");
      std::shared_ptr<FsNode> node = Lookup(target);
      if (!node) {
        throw EntryFail("hardlink to " + Quote(link) + ", which is not an earlier entry of the layer; "
                        "the layer is malformed");
      }
      if (node->is_dir()) throw EntryFail("hardlink to the directory " + Quote(link) + "; directories cannot be hardlinked");
      Place(parts, std::move(node));
      return;
    }

    auto node = std::make_shared<FsNode>();
    Metadata(e, *node);
    switch (archive_entry_filetype(e)) {
      case AE_IFDIR:
        node->mode |= S_IFDIR;
        Place(parts, std::move(node));
        return;
      case AE_IFLNK: {
        const char* target = archive_entry_symlink(e);
        if (!target || !*target) throw EntryFail("symlink without a target");
        // Kept as data: an absolute target resolves inside the guest's root.
        node->target = target;
        CheckLength(node->target, "symlink target");
        node->mode |= S_IFLNK;
        Place(parts, std::move(node));
        return;
      }
      case AE_IFCHR:
      case AE_IFBLK: {
        node->mode |= archive_entry_filetype(e) == AE_IFCHR ? S_IFCHR : S_IFBLK;
        uint32_t major = static_cast<uint32_t>(archive_entry_rdevmajor(e));
        uint32_t minor = static_cast<uint32_t>(archive_entry_rdevminor(e));
        if (major > 0xfff || minor > 0xfffff) {
          throw EntryFail("device " + std::to_string(major) + ":" + std::to_string(minor) + " does not fit squashfs' 12:20 bits");
        }
        // The old Linux encoding the squashfs kernel driver decodes.
        node->devno = (minor & 0xff) | (major << 8) | ((minor & ~0xffu) << 12);
        Place(parts, std::move(node));
        return;
      }
      case AE_IFIFO:
        node->mode |= S_IFIFO;
        Place(parts, std::move(node));
        return;
      case AE_IFREG:
        node->mode |= S_IFREG;
        if (parts.empty()) throw EntryFail("the layer's root must be a directory");
        // Place first: a bad parent fails before any data is written.
        Place(parts, node);
        FileData(a, e, ctx, node);
        return;
      default:
        throw EntryFail("unsupported tar entry type " + std::to_string(archive_entry_filetype(e)));
    }
  }

  void Whiteout(archive_entry* e, const std::vector<std::string>& parts, const std::string& base) {
    if (base == kOpaqueMarker) {
      FsNode& dir = Parent(parts, parts.size() - 1);
      dir.xattrs[kOpaqueXattr] = "y";
      return;
    }
    // Other ".wh..wh." names are AUFS bookkeeping (e.g. ".wh..wh.plnk"), not content.
    if (base.rfind(".wh..wh.", 0) == 0) return;
    std::string hidden = base.substr(std::strlen(kWhiteoutPrefix));
    if (hidden.empty() || hidden == "." || hidden == "..") throw EntryFail("whiteout without a name");
    auto node = std::make_shared<FsNode>();
    Metadata(e, *node);
    // overlayfs' whiteout: a 0:0 character device, no permissions.
    node->mode = S_IFCHR;
    node->devno = 0;
    node->xattrs.clear();
    std::vector<std::string> target(parts.begin(), parts.end() - 1);
    target.push_back(hidden);
    Place(target, std::move(node));
  }

  void FileData(archive* a, archive_entry* e, ReadContext& ctx, const std::shared_ptr<FsNode>& node) {
    int64_t size = archive_entry_size_is_set(e) ? archive_entry_size(e) : 0;
    if (size < 0) throw EntryFail("negative file size");
    expanded_ += static_cast<uint64_t>(size);
    if (expanded_ > opts_.limits.max_bytes) {
      throw EntryFail("tar bomb: the layer's files expand to more than " + std::to_string(opts_.limits.max_bytes) +
                      " bytes (maxBytes, sparse files counted at full size); raise the limit if the layer is trusted");
    }
    writer_.BeginFile(node);
    uint64_t at = 0;
    for (;;) {
      const void* buf = nullptr;
      size_t n = 0;
      la_int64_t off = 0;
      int rc = archive_read_data_block(a, &buf, &n, &off);
      if (rc == ARCHIVE_EOF) break;
      if (rc != ARCHIVE_OK && rc != ARCHIVE_WARN) {
        RethrowStreamError(ctx);
        throw EntryFail(std::string("cannot read file data: ") + ErrorString(a) + "; the layer is damaged or truncated");
      }
      if (off < 0 || static_cast<uint64_t>(off) < at || static_cast<uint64_t>(off) + n > static_cast<uint64_t>(size)) {
        throw EntryFail("file data outside its declared size " + std::to_string(size) + " (bad sparse map)");
      }
      writer_.AppendZeros(static_cast<uint64_t>(off) - at);
      writer_.Append(buf, n);
      at = static_cast<uint64_t>(off) + n;
    }
    writer_.AppendZeros(static_cast<uint64_t>(size) - at);
    writer_.EndFile();
  }

  const std::string& input_;
  const LayerOptions& opts_;
  SquashfsWriter& writer_;
  std::shared_ptr<FsNode> root_;
  std::string current_;
  uint64_t entries_ = 0;
  uint64_t expanded_ = 0;
};

std::atomic<uint64_t> g_temp_seq{0};

void SyncPath(const std::string& path, int flags) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) throw SysError(ErrorKind::Image, "open " + path + " for fsync");
  int rc = ::fsync(fd);
  int e = errno;
  ::close(fd);
  if (rc != 0) throw VmmError(ErrorKind::Image, "fsync " + path, "", e);
}

std::string DirName(const std::string& path) {
  size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

LayerCompression ParseLayerCompression(const std::string& name) {
  if (name == "auto") return LayerCompression::Auto;
  if (name == "gzip") return LayerCompression::Gzip;
  if (name == "zstd") return LayerCompression::Zstd;
  if (name == "none") return LayerCompression::None;
  throw VmmError(ErrorKind::InvalidArgument, "layer compression " + Quote(name), "expected gzip, zstd, none or auto");
}

LayerConversion ConvertLayer(const std::string& input, const std::string& output, const LayerOptions& options) {
  if (output.empty()) throw VmmError(ErrorKind::InvalidArgument, "convert layer " + input, "no output path given");
  // pid plus a sequence number: two conversions in one process (two pulls
  // sharing a layer) must not write the same temporary file.
  std::string tmp = output + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(g_temp_seq++);
  Utf8LocaleScope locale;
  LayerConversion result;
  try {
    LayerStream stream(input, options.compression, options.limits.max_bytes);
    {
      SquashfsWriter writer(tmp, options.block_size, options.workers, options.compression_level);
      LayerConverter conv(input, options, writer);
      conv.Run(stream);
      stream.Drain();
      result.squashfs_bytes = writer.Finish(conv.root());
      result.entries = conv.entries();
    }
    result.diff_id = stream.DiffId();
    result.tar_bytes = stream.bytes();
    if (options.durable) SyncPath(tmp, O_RDONLY);
    if (::rename(tmp.c_str(), output.c_str()) != 0) throw SysError(ErrorKind::Image, "rename " + tmp + " to " + output);
    if (options.durable) SyncPath(DirName(output), O_RDONLY | O_DIRECTORY);
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  return result;
}

}  // namespace vmlet::image
