// JS binding of kvm::Machine: createVm(config) -> Promise<VmHandle>, and on a
// handle start/pause/resume/kill/wait/stats. Only native/ts/vmm.ts calls it.
//
// Nothing here blocks Node's event loop: creation (file reads, KVM set-up),
// pause (waits for vCPUs to park) and teardown (joins vCPU threads) run on
// libuv's pool; a stopping VM reaches JS through a ThreadSafeFunction.
// Lifetime: a handle holds a strong reference to itself from creation until
// its teardown finished, so a VM never depends on the garbage collector; the
// running VM's ThreadSafeFunction also keeps the process alive, like a child
// process would.
#include <napi.h>

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "addon/async.h"
#include "addon/disk_specs.h"
#include "addon/registry.h"
#include "addon/snapshot_binding.h"
#include "core/error.h"
#include "kvm/machine.h"
#include "kvm/vm_shell.h"

namespace vmlet::addon {
namespace {

[[noreturn]] void ThrowInvalid(Napi::Env env, const std::string& msg) {
  ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, "create VM", msg));
}

std::string GetString(Napi::Env env, Napi::Object o, const char* key, bool required) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() && !required) return {};
  if (!v.IsString()) ThrowInvalid(env, std::string("config.") + key + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

double GetNumber(Napi::Env env, Napi::Object o, const char* key, bool required, double dflt) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() && !required) return dflt;
  if (!v.IsNumber()) ThrowInvalid(env, std::string("config.") + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

kvm::MachineConfig ParseConfig(Napi::Env env, Napi::Value value) {
  if (!value.IsObject()) ThrowInvalid(env, "the VM config must be an object");
  Napi::Object o = value.As<Napi::Object>();
  kvm::MachineConfig c;
  c.boot.kernel = GetString(env, o, "kernel", true);
  c.boot.initrd = GetString(env, o, "initrd", false);
  c.boot.cmdline = GetString(env, o, "cmdline", false);
  std::string proto = GetString(env, o, "bootProtocol", false);
  if (proto.empty() || proto == "auto") c.boot.protocol = boot::Protocol::Auto;
  else if (proto == "pvh") c.boot.protocol = boot::Protocol::Pvh;
  else if (proto == "linux") c.boot.protocol = boot::Protocol::Linux64;
  else ThrowInvalid(env, "config.bootProtocol is '" + proto + "': use 'auto', 'pvh' or 'linux'");
  double mib = GetNumber(env, o, "memoryMiB", true, 0);
  if (!(mib >= 2 && mib <= (1 << 20) && mib == static_cast<double>(static_cast<uint64_t>(mib))))
    ThrowInvalid(env, "config.memoryMiB must be a whole number from 2 to 1048576");
  c.memory_bytes = static_cast<uint64_t>(mib) << 20;
  double cpus = GetNumber(env, o, "cpus", true, 1);
  if (!(cpus >= 1 && cpus <= 254 && cpus == static_cast<double>(static_cast<uint32_t>(cpus))))
    ThrowInvalid(env, "config.cpus must be a whole number from 1 to 254");
  c.cpus = static_cast<uint32_t>(cpus);
  c.serial_log = GetString(env, o, "serialLog", true);
  c.kvm_device = GetString(env, o, "kvmDevice", false);
  Napi::Value mask = o.Get("maskKvmParavirt");
  c.mask_kvm_paravirt = mask.IsBoolean() && mask.As<Napi::Boolean>().Value();
  c.disks = ParseDiskSpecs(env, o.Get("disks"), "create VM", "config");
  Napi::Value vsock = o.Get("vsock");
  if (!vsock.IsUndefined()) {
    if (!vsock.IsObject()) ThrowInvalid(env, "config.vsock must be an object");
    Napi::Object vo = vsock.As<Napi::Object>();
    kvm::VsockSpec vs;
    vs.guest_cid = static_cast<uint64_t>(GetNumber(env, vo, "cid", true, 0));
    vs.uds_path = GetString(env, vo, "udsPath", true);
    c.vsock = vs;
  }
  return c;
}

Napi::Object ExitToJs(Napi::Env env, const kvm::VmExit& e) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("reason", Napi::String::New(env, kvm::ReasonName(e.reason)));
  switch (e.reason) {
    case kvm::VmExit::Reason::GuestExit: o.Set("code", Napi::Number::New(env, e.code)); break;
    case kvm::VmExit::Reason::Shutdown:
    case kvm::VmExit::Reason::Error: o.Set("message", Napi::String::New(env, e.message)); break;
    case kvm::VmExit::Reason::EmulationFailure:
      o.Set("message", Napi::String::New(env, e.message));
      o.Set("rip", Napi::BigInt::New(env, e.rip));
      o.Set("instruction", Napi::Buffer<uint8_t>::Copy(env, e.instruction.data(), e.instruction.size()));
      break;
    case kvm::VmExit::Reason::Reset:
    case kvm::VmExit::Reason::Killed: break;
  }
  return o;
}

class VmHandle : public Napi::ObjectWrap<VmHandle> {
 public:
  static Napi::FunctionReference* constructor;

  static void Init(Napi::Env env, Napi::Object exports) {
    Napi::Function f = DefineClass(env, "VmHandle",
                                   {InstanceMethod("start", &VmHandle::Start), InstanceMethod("pause", &VmHandle::Pause),
                                    InstanceMethod("resume", &VmHandle::Resume), InstanceMethod("kill", &VmHandle::Kill),
                                    InstanceMethod("wait", &VmHandle::Wait), InstanceMethod("stats", &VmHandle::Stats),
                                    InstanceMethod("cmdline", &VmHandle::Cmdline),
                                    InstanceMethod("attachDisk", &VmHandle::AttachDisk),
                                    InstanceMethod("snapshot", &VmHandle::Snapshot),
                                    InstanceMethod("kvmStats", &VmHandle::KvmStats)});
    constructor = new Napi::FunctionReference(Napi::Persistent(f));
    env.SetInstanceData<Napi::FunctionReference>(constructor);
    exports.Set("VmHandle", f);
  }

  // Called only from CreateWorker with an External<Machine> it gives up.
  explicit VmHandle(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<VmHandle>(info), done_(Napi::Promise::Deferred::New(info.Env())) {
    if (info.Length() != 1 || !info[0].IsExternal())
      ThrowVmmError(info.Env(), VmmError(ErrorKind::InvalidArgument, "new VmHandle", "use createVm(config)"));
    machine_.reset(info[0].As<Napi::External<kvm::Machine>>().Data());
    // The Deferred's promise value is scoped to this call: keep it alive by reference.
    done_promise_ = Napi::Persistent(done_.Promise().As<Napi::Object>());
    Ref();  // released when teardown completes: the VM never waits on GC
  }

  ~VmHandle() override {
    // Only reached after teardown, or at environment shutdown; Teardown is idempotent.
    if (machine_) machine_->Teardown();
  }

 private:
  class TeardownWorker : public PromiseWorker {
   public:
    TeardownWorker(Napi::Env env, VmHandle* vm) : PromiseWorker(env), vm_(vm) {}
    void Work() override { exit_ = vm_->machine_->Teardown(); }
    Napi::Value Result(Napi::Env env) override {
      Napi::Object o = ExitToJs(env, exit_);
      vm_->done_.Resolve(o);
      vm_->Unref();
      return o;
    }
    void OnError(const Napi::Error& e) override {
      vm_->done_.Reject(ToJsError(Env(), error_));
      vm_->Unref();
      PromiseWorker::OnError(e);
    }

   private:
    VmHandle* vm_;
    kvm::VmExit exit_;
  };

  class PauseWorker : public PromiseWorker {
   public:
    // Holds the handle object so the machine outlives a wait still queued.
    // A worker is created and destroyed on the JS thread, so it may own a reference.
    PauseWorker(const Napi::Object& handle, kvm::Machine* m, uint64_t generation)
        : PromiseWorker(handle.Env()), handle_(Napi::Persistent(handle)), m_(m), generation_(generation) {}
    void Work() override { m_->WaitPaused(generation_); }
    Napi::Value Result(Napi::Env env) override { return env.Undefined(); }

   private:
    Napi::ObjectReference handle_;
    kvm::Machine* m_;
    uint64_t generation_;
  };

  void BeginTeardown(Napi::Env env) {
    if (teardown_started_) return;
    teardown_started_ = true;
    auto* w = new TeardownWorker(env, this);
    w->Queue();
  }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (teardown_started_)
      ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, "start VM", "the VM was killed or has exited: create a new one"));
    if (machine_->started())
      ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, "start VM", "the VM is already started"));
    tsfn_ = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "vmlet-vm-exit", 0, 1);
    Napi::ThreadSafeFunction tsfn = tsfn_;
    try {
      machine_->Start([this, tsfn](const kvm::VmExit&) mutable {
        // On the last vCPU thread: hand the stop to the JS thread, which
        // starts the teardown (joining this very thread must not happen here).
        tsfn.BlockingCall([this](Napi::Env env, Napi::Function) { BeginTeardown(env); });
        tsfn.Release();
      });
    } catch (const std::exception& e) {
      // The machine will not call back: release the exit channel here and
      // free what was started, so wait()/kill() still settle.
      tsfn_.Release();
      BeginTeardown(env);
      ThrowVmmError(env, e);
    }
    return env.Undefined();
  }

  Napi::Value Pause(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!machine_->started())
      ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, "pause VM", "the VM is not started: call start() first"));
    uint64_t generation;
    try {
      generation = machine_->RequestPause();  // on this thread: ordered before any later resume()
    } catch (const std::exception& e) {
      ThrowVmmError(env, e);
    }
    auto* w = new PauseWorker(Value(), machine_.get(), generation);
    Napi::Promise p = w->Promise();
    w->Queue();
    return p;
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    machine_->Resume();
    return info.Env().Undefined();
  }

  Napi::Value Kill(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!teardown_started_) {
      if (machine_->started()) {
        kvm::VmExit e;
        e.reason = kvm::VmExit::Reason::Killed;
        machine_->RequestStop(std::move(e));  // the exit callback starts the teardown
      } else {
        BeginTeardown(env);
      }
    }
    return done_promise_.Value();
  }

  Napi::Value Wait(const Napi::CallbackInfo&) { return done_promise_.Value(); }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    kvm::MachineStats s = machine_->Stats();
    Napi::Object o = Napi::Object::New(env);
    Napi::Object exits = Napi::Object::New(env);
    for (auto& [name, n] : s.exits) exits.Set(name, Napi::Number::New(env, static_cast<double>(n)));
    o.Set("exits", exits);
    o.Set("createdNs", Napi::BigInt::New(env, s.created_ns));
    if (s.first_entry_ns) o.Set("firstEntryNs", Napi::BigInt::New(env, s.first_entry_ns));
    if (s.boot_load_ns) o.Set("bootLoadNs", Napi::BigInt::New(env, s.boot_load_ns));
    o.Set("vmShell", Napi::Boolean::New(env, s.from_shell));
    if (s.restored_ns) {
      o.Set("restoredNs", Napi::BigInt::New(env, s.restored_ns));
      o.Set("vsockResetSent", Napi::Boolean::New(env, machine_->vsock_reset_sent()));
      o.Set("memoryOverlayBytes", Napi::Number::New(env, static_cast<double>(s.overlay_bytes)));
    }
    return o;
  }

  Napi::Value KvmStats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::map<std::string, uint64_t> stats;
    try {
      stats = machine_->KvmStatistics();
    } catch (const std::exception& e) {
      ThrowVmmError(env, e);
    }
    Napi::Object o = Napi::Object::New(env);
    for (auto& [name, v] : stats) o.Set(name, Napi::BigInt::New(env, v));
    return o;
  }

  Napi::Value Cmdline(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), machine_->cmdline()); }

  // attachDisk(index, path): an empty slot takes a read-only medium (kvm/machine.h AttachDisk).
  Napi::Value AttachDisk(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsString())
      ThrowInvalid(env, "attachDisk(index, path): index a number, path a string");
    double index = info[0].As<Napi::Number>().DoubleValue();
    if (!(index >= 0 && index < 1024 && index == static_cast<double>(static_cast<uint32_t>(index))))
      ThrowInvalid(env, "attachDisk: index must be a whole number from 0");
    if (teardown_started_)
      ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, "attach disk", "the VM was killed or has exited"));
    try {
      machine_->AttachDisk(static_cast<uint32_t>(index), info[1].As<Napi::String>().Utf8Value());
    } catch (const std::exception& e) {
      ThrowVmmError(env, e);
    }
    return env.Undefined();
  }

  Napi::Value Snapshot(const Napi::CallbackInfo& info) {
    if (teardown_started_)
      ThrowVmmError(info.Env(), VmmError(ErrorKind::InvalidArgument, "snapshot VM", "the VM was killed or has exited"));
    return SnapshotMachine(info, Value(), machine_.get());
  }

  std::unique_ptr<kvm::Machine> machine_;
  Napi::ThreadSafeFunction tsfn_;
  Napi::Promise::Deferred done_;
  Napi::ObjectReference done_promise_;
  bool teardown_started_ = false;
};

Napi::FunctionReference* VmHandle::constructor = nullptr;

class CreateWorker : public PromiseWorker {
 public:
  CreateWorker(Napi::Env env, kvm::MachineConfig config) : PromiseWorker(env), config_(std::move(config)) {}
  void Work() override { machine_ = std::make_unique<kvm::Machine>(config_); }
  Napi::Value Result(Napi::Env env) override {
    auto* ctor = env.GetInstanceData<Napi::FunctionReference>();
    return ctor->New({Napi::External<kvm::Machine>::New(env, machine_.release())});
  }

 private:
  kvm::MachineConfig config_;
  std::unique_ptr<kvm::Machine> machine_;
};

Napi::Value CreateVm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  kvm::MachineConfig config = ParseConfig(env, info[0]);
  auto* w = new CreateWorker(env, std::move(config));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// Fills the process's VM shell reserve (kvm/vm_shell.h) on libuv's pool:
// KVM_CREATE_VM is what it takes off the path of the next create or restore.
class FillShellsWorker : public PromiseWorker {
 public:
  FillShellsWorker(Napi::Env env, std::string device, size_t count) : PromiseWorker(env), device_(std::move(device)), count_(count) {}
  void Work() override { held_ = kvm::VmShellReserve::Get().Fill(device_, count_); }
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, static_cast<double>(held_)); }

 private:
  std::string device_;
  size_t count_;
  size_t held_ = 0;
};

Napi::Value FillVmShells(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double count = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
  // NaN fails the first test, so the cast below only sees 0..kMaxHeld.
  if (!(count >= 0 && count <= double(kvm::VmShellReserve::kMaxHeld)) || std::floor(count) != count)
    ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, "fill VM shells",
                                "count must be a whole number from 0 to " + std::to_string(kvm::VmShellReserve::kMaxHeld)));
  std::string device = kvm::DefaultDevicePath();
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    if (!info[1].IsString() || info[1].As<Napi::String>().Utf8Value().empty())
      ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, "fill VM shells", "kvmDevice must be the path of a KVM device"));
    device = info[1].As<Napi::String>().Utf8Value();
  }
  auto* w = new FillShellsWorker(env, std::move(device), static_cast<size_t>(count));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

void InitVm(Napi::Env env, Napi::Object exports) {
  VmHandle::Init(env, exports);
  exports.Set("createVm", Napi::Function::New(env, CreateVm, "createVm"));
  exports.Set("defaultKvmDevice", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
                return Napi::String::New(info.Env(), kvm::DefaultDevicePath());
              }));
  exports.Set("fillVmShells", Napi::Function::New(env, FillVmShells, "fillVmShells"));
  exports.Set("drainVmShells", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
                return Napi::Number::New(info.Env(), static_cast<double>(kvm::VmShellReserve::Get().Drain()));
              }));
  exports.Set("heldVmShells", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
                return Napi::Number::New(info.Env(), static_cast<double>(kvm::VmShellReserve::Get().Held()));
              }));
}

Registrar reg("vm", InitVm);

}  // namespace
}  // namespace vmlet::addon
