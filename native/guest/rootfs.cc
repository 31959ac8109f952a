#include "rootfs.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

namespace vmlet::agent {

namespace {

std::string Errno(const std::string& what, int err) { return what + ": " + std::strerror(err); }

bool MkdirP(const std::string& path, std::string* error) {
  std::string cur;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    cur = path.substr(0, pos);
    if (cur.empty()) continue;
    if (mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) {
      *error = Errno("mkdir " + cur, errno);
      return false;
    }
  }
  return true;
}

// Attaches a regular file to a free loop device, read-only with autoclear so
// the device goes away with the last unmount (no leak when a test's mount
// namespace dies). Several engineers and tests share the loop devices of a
// host: a device taken between GET_FREE and CONFIGURE gives EBUSY, so retry.
bool AttachLoop(const std::string& file, std::string* dev, int* dev_fd, std::string* error) {
  int ffd = open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (ffd < 0) {
    *error = Errno("open layer " + file, errno);
    return false;
  }
  int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (ctl < 0) {
    *error = Errno("open /dev/loop-control (needed to attach layer file " + file + ")", errno);
    close(ffd);
    return false;
  }
  bool ok = false;
  for (int attempt = 0; attempt < 16 && !ok; attempt++) {
    int n = ioctl(ctl, LOOP_CTL_GET_FREE);
    if (n < 0) {
      *error = Errno("LOOP_CTL_GET_FREE for " + file, errno);
      break;
    }
    std::string path = "/dev/loop" + std::to_string(n);
    int lfd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (lfd < 0) {
      *error = Errno("open " + path, errno);
      continue;
    }
    loop_config cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.fd = static_cast<uint32_t>(ffd);
    cfg.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
    std::strncpy(reinterpret_cast<char*>(cfg.info.lo_file_name), file.c_str(), LO_NAME_SIZE - 1);
    if (ioctl(lfd, LOOP_CONFIGURE, &cfg) != 0) {
      *error = Errno("LOOP_CONFIGURE " + path + " with " + file, errno);
      close(lfd);
      if (errno == EBUSY) continue;
      break;
    }
    *dev = path;
    *dev_fd = lfd;
    ok = true;
  }
  close(ctl);
  close(ffd);
  return ok;
}

// A layer disk may be a slot of the template this VM was restored from, empty
// (0 sectors) when the snapshot was taken: the host put the image's layer in
// it at restore and raised a configuration-change interrupt, and the kernel
// learns the new size in a work item that may not have run yet. Wait for it,
// bounded: a slot still empty after that is a host that attached nothing.
bool WaitForMedium(const std::string& dev, size_t index, std::string* error) {
  int fd = open(dev.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *error = Errno("open layer " + std::to_string(index) + " device " + dev, errno);
    return false;
  }
  timespec start{};
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) {
      *error = Errno("BLKGETSIZE64 " + dev, errno);
      close(fd);
      return false;
    }
    if (bytes > 0) break;
    timespec now{};
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long waited_ms = (now.tv_sec - start.tv_sec) * 1000LL + (now.tv_nsec - start.tv_nsec) / 1000000;
    if (waited_ms >= kMediumWaitMs) {
      *error = "layer " + std::to_string(index) + " device " + dev + " is an empty disk (0 bytes after " +
               std::to_string(kMediumWaitMs) + " ms): the host attached no image to this slot";
      close(fd);
      return false;
    }
    timespec pause{0, 1000000};  // 1 ms: the work item usually runs within one tick
    nanosleep(&pause, nullptr);
  }
  close(fd);
  return true;
}

}  // namespace

bool ValidRootfsName(const std::string& name) {
  if (name.empty() || name.size() > 128 || name == "." || name == "..") return false;
  for (char c : name) {
    bool good = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                c == '_' || c == '-';
    if (!good) return false;
  }
  return true;
}

bool StackRootfs(const std::string& state_dir, const std::string& name, const std::vector<std::string>& layers,
                 const std::string& upper, StackedRootfs* out, std::string* error) {
  if (!ValidRootfsName(name)) {
    *error = "rootfs name '" + name + "' is not one path component of [A-Za-z0-9._-]";
    return false;
  }
  if (layers.empty()) {
    *error = "no layers given for rootfs '" + name + "': send at least one squashfs layer";
    return false;
  }
  if (upper != "tmpfs") {
    *error = "upper layer kind '" + upper + "' is not supported: version 1 knows only 'tmpfs'";
    return false;
  }
  std::string base = state_dir + "/" + name;
  struct stat st;
  std::string lowerdir;
  for (size_t i = 0; i < layers.size(); i++) {
    const std::string& layer = layers[i];
    if (stat(layer.c_str(), &st) != 0) {
      *error = Errno("layer " + std::to_string(i) + " '" + layer + "'", errno);
      return false;
    }
    std::string dev = layer;
    int loop_fd = -1;
    if (S_ISREG(st.st_mode)) {
      if (!AttachLoop(layer, &dev, &loop_fd, error)) return false;
    } else if (!S_ISBLK(st.st_mode)) {
      *error = "layer " + std::to_string(i) + " '" + layer + "' is neither a block device nor a regular file";
      return false;
    } else if (!WaitForMedium(layer, i, error)) {
      return false;
    }
    std::string mp = base + "/layers/" + std::to_string(i);
    if (!MkdirP(mp, error)) {
      if (loop_fd >= 0) close(loop_fd);
      return false;
    }
    int rc = mount(dev.c_str(), mp.c_str(), "squashfs", MS_RDONLY | MS_NODEV | MS_NOSUID, nullptr);
    int err = errno;
    // The mount holds the loop device now; closing our fd lets autoclear
    // detach it once the layer is unmounted.
    if (loop_fd >= 0) close(loop_fd);
    if (rc != 0) {
      *error = Errno("mount squashfs layer " + std::to_string(i) + " (" + layer + " via " + dev + ") on " + mp, err);
      return false;
    }
    // overlayfs lists the top-most lower layer first.
    lowerdir = i == 0 ? mp : mp + ":" + lowerdir;
  }
  std::string up = base + "/upper";
  if (!MkdirP(up, error)) return false;
  if (mount("tmpfs", up.c_str(), "tmpfs", MS_NODEV | MS_NOSUID, "mode=0755") != 0) {
    *error = Errno("mount tmpfs upper on " + up, errno);
    return false;
  }
  if (!MkdirP(up + "/data", error) || !MkdirP(up + "/work", error)) return false;
  std::string merged = base + "/rootfs";
  if (!MkdirP(merged, error)) return false;
  std::string opts = "lowerdir=" + lowerdir + ",upperdir=" + up + "/data,workdir=" + up + "/work";
  if (mount("overlay", merged.c_str(), "overlay", 0, opts.c_str()) != 0) {
    *error = Errno("mount overlay on " + merged + " (" + opts + ")", errno);
    return false;
  }
  // The container sees the kernel's /proc and the agent's /dev, as under runc.
  // The mount points are created in the upper layer, never in an image.
  for (const char* d : {"/proc", "/dev"}) {
    if (!MkdirP(merged + d, error)) return false;
  }
  if (mount("proc", (merged + "/proc").c_str(), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0) {
    *error = Errno("mount proc in " + merged, errno);
    return false;
  }
  if (mount("/dev", (merged + "/dev").c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) {
    *error = Errno("bind /dev into " + merged, errno);
    return false;
  }
  out->merged = merged;
  return true;
}

}  // namespace vmlet::agent
