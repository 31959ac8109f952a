#include "init.h"

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

namespace vmlet::agent {

void MountEarlyFilesystems(std::vector<std::string>* errors) {
  struct M {
    const char* source;
    const char* target;
    const char* type;
    unsigned long flags;
    const char* data;
  };
  // devtmpfs before devpts/shm: they mount inside it.
  static const M kMounts[] = {
      {"proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr},
      {"sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr},
      // No options: devtmpfs has one superblock per kernel and options given here
      // would reconfigure it for every namespace that mounts it.
      {"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, nullptr},
      {"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
      {"shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
      {"cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr},
      {"run", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"},
  };
  for (const M& m : kMounts) {
    mkdir(m.target, 0755);
    if (mount(m.source, m.target, m.type, m.flags, m.data) != 0 && errno != EBUSY) {
      errors->push_back(std::string("mount ") + m.type + " on " + m.target + ": " + std::strerror(errno));
    }
  }
  // With a private devpts instance /dev/ptmx must reach its ptmx. A bind
  // mount, not a symlink: devtmpfs is one superblock per kernel, so an unlink
  // would also change /dev of every other mount namespace (a host, in tests).
  if (mount("/dev/pts/ptmx", "/dev/ptmx", nullptr, MS_BIND, nullptr) != 0)
    errors->push_back(std::string("bind /dev/pts/ptmx on /dev/ptmx: ") + std::strerror(errno));
}

KernelCmdline ParseKernelCmdline(const std::string& cmdline) {
  KernelCmdline out;
  // Split on the kernel's own separators by hand: an istringstream would link
  // libstdc++'s iostreams and locales into the agent (~1 MiB of its static
  // binary, unpacked from the initramfs on every cold boot).
  size_t pos = 0;
  while (pos < cmdline.size()) {
    while (pos < cmdline.size() && std::isspace(static_cast<unsigned char>(cmdline[pos]))) pos++;
    size_t end = pos;
    while (end < cmdline.size() && !std::isspace(static_cast<unsigned char>(cmdline[end]))) end++;
    if (end == pos) break;
    std::string word = cmdline.substr(pos, end - pos);
    pos = end;
    if (word.rfind("vmlet.layers=", 0) == 0) {
      std::string list = word.substr(13);
      size_t start = 0;
      while (start <= list.size()) {
        size_t comma = list.find(',', start);
        std::string item = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        if (!item.empty()) out.layers.push_back(item);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    } else if (word.rfind("vmlet.port=", 0) == 0) {
      out.vsock_port = static_cast<unsigned>(std::strtoul(word.c_str() + 11, nullptr, 10));
    }
  }
  return out;
}

}  // namespace vmlet::agent
