// Stacking a container's root filesystem: the image's layer squashfs images
// (block devices in a VM, or regular files the agent loop-attaches when it
// runs on a host) read-only under overlayfs, with a tmpfs upper layer so a
// write inside the container never reaches an image.
#pragma once

#include <string>
#include <vector>

namespace vmlet::agent {

struct StackedRootfs {
  std::string merged;  // the directory the container chroots into
};

// layers: lowest first. state_dir: where the per-rootfs mount points live
// (<state_dir>/<name>/{layers/N,upper,rootfs}). Returns false with *error set
// to a message naming the failing step, its path and errno text.
bool StackRootfs(const std::string& state_dir, const std::string& name,
                 const std::vector<std::string>& layers, const std::string& upper,
                 StackedRootfs* out, std::string* error);

// How long a layer on an empty block device (a template's disk slot whose
// new size the kernel has not applied yet) is waited for before the stack
// is refused. Generous: in the KVM lab a guest runs ~20x slower than on
// hardware, and it only bounds the report of a host that attached nothing.
inline constexpr long long kMediumWaitMs = 5000;

// A rootfs name is one path component of [A-Za-z0-9._-], not "." or "..".
bool ValidRootfsName(const std::string& name);

}  // namespace vmlet::agent
