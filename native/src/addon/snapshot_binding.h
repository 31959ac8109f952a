// JS binding of VM snapshots: VmHandle.snapshot(dir) (wired in vm_binding.cc)
// and restoreVm(options) -> Promise<VmHandle>. Only native/ts/vmm.ts calls them.
#pragma once
#include <napi.h>

#include "kvm/machine.h"

namespace vmlet::addon {

// snapshot(dir) of a handle: a promise of the SnapshotInfo; the handle object
// is held until it settles so the machine cannot be freed under the worker.
Napi::Value SnapshotMachine(const Napi::CallbackInfo& info, Napi::Object handle, kvm::Machine* machine);

}  // namespace vmlet::addon
