// The `disks` array of createVm's config and of restoreVm's options: one
// parser, so a disk means the same in both and both refuse the same mistakes.
#pragma once
#include <napi.h>

#include <string>
#include <vector>

#include "kvm/machine.h"

namespace vmlet::addon {

// `disks` may be undefined (no disks). Throws a JS InvalidArgument error
// for `op` ("create VM", "restore VM") naming `owner`.disks[i].field.
std::vector<kvm::DiskSpec> ParseDiskSpecs(Napi::Env env, Napi::Value disks, const std::string& op, const std::string& owner);

}  // namespace vmlet::addon
