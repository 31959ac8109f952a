// Tar corpora for the layer converter's native tests, written with
// libarchive's writer (an independent producer of pax tars), plus gzip/zstd
// compression and a scratch directory that cleans up after itself.
#pragma once
#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <locale.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace vmlet::testing {

class ScratchDir {
 public:
  ScratchDir() {
    char tmpl[] = "/tmp/vmlet-layer-native-XXXXXX";
    if (!mkdtemp(tmpl)) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~ScratchDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  std::vector<std::string> List() const {
    std::vector<std::string> names;
    if (DIR* d = opendir(path_.c_str())) {
      while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") names.push_back(n);
      }
      closedir(d);
    }
    return names;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

inline bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

inline std::string Sha256Hex(const std::string& bytes) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  EVP_Digest(bytes.data(), bytes.size(), out, &len, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) {
    s += hex[out[i] >> 4];
    s += hex[out[i] & 15];
  }
  return s;
}

struct TarBuilder {
  archive* a;
  std::string out;
  // libarchive's pax writer converts names through the thread's locale; the
  // corpus has UTF-8 names, and the test binary runs under "C".
  locale_t utf8 = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(0));
  locale_t prev = uselocale(utf8);

  TarBuilder() : a(archive_write_new()) {
    archive_write_set_format_pax_restricted(a);
    archive_write_set_bytes_per_block(a, 10240);
    archive_write_open(a, this, nullptr, &TarBuilder::Write, nullptr);
  }
  ~TarBuilder() {
    if (a) archive_write_free(a);
    uselocale(prev);
    freelocale(utf8);
  }
  static la_ssize_t Write(archive*, void* self, const void* buf, size_t n) {
    static_cast<TarBuilder*>(self)->out.append(static_cast<const char*>(buf), n);
    return static_cast<la_ssize_t>(n);
  }

  size_t entries = 0;

  archive_entry* Begin(const std::string& path, unsigned type, unsigned perm) {
    ++entries;
    archive_entry* e = archive_entry_new();
    archive_entry_set_pathname(e, path.c_str());
    archive_entry_set_filetype(e, type);
    archive_entry_set_perm(e, perm);
    archive_entry_set_mtime(e, 1700000000, 0);
    return e;
  }
  void Finish(archive_entry* e, const std::string& data = {}) {
    if (archive_write_header(a, e) != ARCHIVE_OK) throw std::runtime_error(archive_error_string(a));
    if (!data.empty()) archive_write_data(a, data.data(), data.size());
    archive_entry_free(e);
  }
  TarBuilder& Dir(const std::string& p, unsigned perm = 0755) {
    Finish(Begin(p, AE_IFDIR, perm));
    return *this;
  }
  TarBuilder& File(const std::string& p, const std::string& data, unsigned perm = 0644, int64_t uid = 0,
                   const char* xattr = nullptr) {
    archive_entry* e = Begin(p, AE_IFREG, perm);
    archive_entry_set_size(e, static_cast<la_int64_t>(data.size()));
    archive_entry_set_uid(e, uid);
    archive_entry_set_gid(e, uid);
    if (xattr) archive_entry_xattr_add_entry(e, xattr, "value", 5);
    Finish(e, data);
    return *this;
  }
  TarBuilder& Symlink(const std::string& p, const std::string& target) {
    archive_entry* e = Begin(p, AE_IFLNK, 0777);
    archive_entry_set_symlink(e, target.c_str());
    Finish(e);
    return *this;
  }
  TarBuilder& Hardlink(const std::string& p, const std::string& target) {
    archive_entry* e = Begin(p, AE_IFREG, 0644);
    archive_entry_set_hardlink(e, target.c_str());
    archive_entry_set_size(e, 0);
    Finish(e);
    return *this;
  }
  TarBuilder& Device(const std::string& p, unsigned type, unsigned major, unsigned minor) {
    archive_entry* e = Begin(p, type, 0660);
    archive_entry_set_rdevmajor(e, major);
    archive_entry_set_rdevminor(e, minor);
    Finish(e);
    return *this;
  }
  std::string Close() {
    archive_write_close(a);
    archive_write_free(a);
    a = nullptr;
    return out;
  }
};

// Every kind of entry the converter handles, in a few KiB: the seed for the
// fuzz loop and the subject of the round-trip checks.
inline std::string CorpusTar(size_t* entries = nullptr) {
  std::string big(300000, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 2654435761u) >> 13);
  TarBuilder t;
  t.Dir("./").Dir("etc/").File("etc/hostname", "vmlet\n").File("etc/shadow", "root:*:1::::::\n", 0640, 42)
      .File("usr/bin/tool", big, 04755, 0, "security.capability")
      .Symlink("bin", "usr/bin").Symlink("abs", "/etc/hostname").Hardlink("usr/bin/tool2", "usr/bin/tool")
      .Device("dev/null", AE_IFCHR, 1, 3).Device("dev/sda", AE_IFBLK, 8, 0).Device("run/fifo", AE_IFIFO, 0, 0)
      .File("var/.wh.gone", "").File("opt/.wh..wh..opq", "").File("opt/new", "n")
      .File("unicode/\xc3\xa9t\xc3\xa9", "summer").File("empty", "");
  if (entries) *entries = t.entries;
  return t.Close();
}

inline std::string Gzip(const std::string& in, int level = 6) {
  z_stream z{};
  deflateInit2(&z, level, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
  std::string out(deflateBound(&z, in.size()) + 64, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  deflate(&z, Z_FINISH);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

inline std::string Zstd(const std::string& in) {
  std::string out(ZSTD_compressBound(in.size()), '\0');
  out.resize(ZSTD_compress(out.data(), out.size(), in.data(), in.size(), 3));
  return out;
}

}  // namespace vmlet::testing
