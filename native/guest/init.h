// What the agent does only as PID 1 of a guest: the early mounts and the
// kernel command line it reads its settings from.
#pragma once

#include <string>
#include <vector>

namespace vmlet::agent {

// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm and cgroup2. A mount
// that fails is reported in *errors and the rest still tried: an agent that
// stops here leaves a guest nobody can talk to.
void MountEarlyFilesystems(std::vector<std::string>* errors);

struct KernelCmdline {
  std::vector<std::string> layers;  // vmlet.layers=/dev/vda,/dev/vdb (lowest first)
  unsigned vsock_port = 0;          // vmlet.port=N
};

KernelCmdline ParseKernelCmdline(const std::string& cmdline);

}  // namespace vmlet::agent
