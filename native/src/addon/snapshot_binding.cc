#include "addon/snapshot_binding.h"

#include <cmath>
#include <memory>
#include <string>

#include "addon/async.h"
#include "addon/disk_specs.h"
#include "addon/registry.h"
#include "core/error.h"
#include "snapshot/snapshot.h"

namespace vmlet::addon {
namespace {

[[noreturn]] void Invalid(Napi::Env env, const std::string& op, const std::string& msg) {
  ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, op, msg));
}

Napi::Object SummaryToJs(Napi::Env env, const snapshot::Summary& s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("dir", s.dir);
  o.Set("version", Napi::Number::New(env, s.version));
  o.Set("memoryBytes", Napi::Number::New(env, static_cast<double>(s.memory_bytes)));
  o.Set("memoryFileBytes", Napi::Number::New(env, static_cast<double>(s.memory_file_bytes)));
  o.Set("memoryDataBytes", Napi::Number::New(env, static_cast<double>(s.memory_data_bytes)));
  o.Set("cpus", Napi::Number::New(env, s.cpus));
  o.Set("kernelSha256", s.kernel_sha256);
  Napi::Array refused = Napi::Array::New(env, s.refused_msrs.size());
  for (uint32_t i = 0; i < s.refused_msrs.size(); i++) refused.Set(i, Napi::Number::New(env, s.refused_msrs[i]));
  o.Set("refusedMsrs", refused);
  Napi::Array skipped = Napi::Array::New(env, s.skipped.size());
  for (uint32_t i = 0; i < s.skipped.size(); i++) skipped.Set(i, s.skipped[i]);
  o.Set("skipped", skipped);
  o.Set("durationNs", Napi::BigInt::New(env, s.duration_ns));
  return o;
}

class SnapshotWorker : public PromiseWorker {
 public:
  SnapshotWorker(const Napi::Object& handle, kvm::Machine* m, std::string dir)
      : PromiseWorker(handle.Env()), handle_(Napi::Persistent(handle)), m_(m), dir_(std::move(dir)) {}
  void Work() override { summary_ = m_->Snapshot(dir_); }
  Napi::Value Result(Napi::Env env) override { return SummaryToJs(env, summary_); }

 private:
  Napi::ObjectReference handle_;
  kvm::Machine* m_;
  std::string dir_;
  snapshot::Summary summary_;
};

class RestoreWorker : public PromiseWorker {
 public:
  RestoreWorker(Napi::Env env, snapshot::RestoreOptions o) : PromiseWorker(env), o_(std::move(o)) {}
  void Work() override { machine_ = snapshot::Restore(o_); }
  Napi::Value Result(Napi::Env env) override {
    // vm_binding.cc's VmHandle constructor, kept as the module's instance data.
    auto* ctor = env.GetInstanceData<Napi::FunctionReference>();
    return ctor->New({Napi::External<kvm::Machine>::New(env, machine_.release())});
  }

 private:
  snapshot::RestoreOptions o_;
  std::unique_ptr<kvm::Machine> machine_;
};

std::string String(Napi::Env env, Napi::Object o, const char* key, bool required, const char* where) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() && !required) return {};
  if (!v.IsString() || v.As<Napi::String>().Utf8Value().empty())
    Invalid(env, "restore VM", std::string(where) + key + " must be a non-empty string");
  return v.As<Napi::String>().Utf8Value();
}

snapshot::RestoreOptions ParseRestore(Napi::Env env, Napi::Value value) {
  if (!value.IsObject()) Invalid(env, "restore VM", "the restore options must be an object");
  Napi::Object o = value.As<Napi::Object>();
  snapshot::RestoreOptions r;
  r.dir = String(env, o, "snapshot", true, "options.");
  r.serial_log = String(env, o, "serialLog", true, "options.");
  r.kvm_device = String(env, o, "kvmDevice", false, "options.");
  Napi::Value expect = o.Get("expect");
  if (!expect.IsUndefined()) {
    if (!expect.IsObject()) Invalid(env, "restore VM", "options.expect must be an object");
    r.expect_kernel_sha256 = String(env, expect.As<Napi::Object>(), "kernelSha256", false, "options.expect.");
    r.expect_initrd_sha256 = String(env, expect.As<Napi::Object>(), "initrdSha256", false, "options.expect.");
  }
  Napi::Value verify = o.Get("verifyMemory");
  r.verify_memory = verify.IsBoolean() && verify.As<Napi::Boolean>().Value();
  r.disks = ParseDiskSpecs(env, o.Get("disks"), "restore VM", "options");
  Napi::Value overlays = o.Get("memoryOverlays");
  if (!overlays.IsUndefined()) {
    if (!overlays.IsArray()) Invalid(env, "restore VM", "options.memoryOverlays must be an array of { gpa, path }");
    Napi::Array a = overlays.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      const std::string at = "options.memoryOverlays[" + std::to_string(i) + "]";
      Napi::Value e = a.Get(i);
      if (!e.IsObject()) Invalid(env, "restore VM", at + " must be an object { gpa, path }");
      Napi::Value gpa = e.As<Napi::Object>().Get("gpa");
      // Whole numbers up to 2^53 are exact in a double; RAM ends far below.
      double g = gpa.IsNumber() ? gpa.As<Napi::Number>().DoubleValue() : -1;
      if (!(g >= 0 && g <= 9007199254740991.0) || std::floor(g) != g) Invalid(env, "restore VM", at + ".gpa must be a whole number of bytes");
      GuestMemory::Overlay ov;
      ov.gpa = static_cast<uint64_t>(g);
      ov.path = String(env, e.As<Napi::Object>(), "path", true, (at + ".").c_str());
      r.memory_overlays.push_back(std::move(ov));
    }
  }
  Napi::Value vsock = o.Get("vsock");
  if (!vsock.IsUndefined()) {
    if (!vsock.IsObject()) Invalid(env, "restore VM", "options.vsock must be an object");
    Napi::Object vo = vsock.As<Napi::Object>();
    Napi::Value cid = vo.Get("cid");
    if (!cid.IsNumber()) Invalid(env, "restore VM", "options.vsock.cid must be a number");
    kvm::VsockSpec vs;
    vs.guest_cid = static_cast<uint64_t>(cid.As<Napi::Number>().DoubleValue());
    vs.uds_path = String(env, vo, "udsPath", true, "options.vsock.");
    r.vsock = vs;
  }
  return r;
}

// What a snapshot directory holds, checked (state file and memory file size)
// but not restored: a template pool compares it with its inputs.
class InspectWorker : public PromiseWorker {
 public:
  InspectWorker(Napi::Env env, std::string dir) : PromiseWorker(env), dir_(std::move(dir)) {}
  void Work() override { image_ = snapshot::Image::Load(dir_); }
  Napi::Value Result(Napi::Env env) override {
    const auto& c = image_.config;
    Napi::Object o = Napi::Object::New(env);
    o.Set("dir", dir_);
    o.Set("version", Napi::Number::New(env, image_.version));
    o.Set("memoryBytes", Napi::Number::New(env, static_cast<double>(c.memory_bytes)));
    o.Set("memoryFileBytes", Napi::Number::New(env, static_cast<double>(image_.memory_allocated_bytes)));
    o.Set("memoryDataBytes", Napi::Number::New(env, static_cast<double>(c.memory_data_bytes)));
    o.Set("cpus", Napi::Number::New(env, c.cpus));
    o.Set("kernel", c.kernel.path);
    o.Set("kernelSha256", c.kernel.sha256);
    if (c.initrd) {
      o.Set("initrd", c.initrd->path);
      o.Set("initrdSha256", c.initrd->sha256);
    }
    o.Set("cmdline", c.boot_cmdline);
    Napi::Array disks = Napi::Array::New(env, c.disks.size());
    for (uint32_t i = 0; i < c.disks.size(); i++) {
      Napi::Object d = Napi::Object::New(env);
      d.Set("readOnly", Napi::Boolean::New(env, c.disks[i].read_only));
      d.Set("id", c.disks[i].id);
      disks.Set(i, d);
    }
    o.Set("disks", disks);
    o.Set("vsock", Napi::Boolean::New(env, c.has_vsock));
    return o;
  }

 private:
  std::string dir_;
  snapshot::Image image_;
};

Napi::Value InspectSnapshot(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString() || info[0].As<Napi::String>().Utf8Value().empty())
    Invalid(env, "inspect snapshot", "inspectSnapshot(dir): dir must be a snapshot directory");
  auto* w = new InspectWorker(env, info[0].As<Napi::String>().Utf8Value());
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value RestoreVm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto* w = new RestoreWorker(env, ParseRestore(env, info[0]));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

void InitSnapshot(Napi::Env env, Napi::Object exports) {
  exports.Set("restoreVm", Napi::Function::New(env, RestoreVm, "restoreVm"));
  exports.Set("inspectSnapshot", Napi::Function::New(env, InspectSnapshot, "inspectSnapshot"));
}

Registrar reg("snapshot", InitSnapshot);

}  // namespace

Napi::Value SnapshotMachine(const Napi::CallbackInfo& info, Napi::Object handle, kvm::Machine* machine) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString() || info[0].As<Napi::String>().Utf8Value().empty())
    Invalid(env, "snapshot VM", "snapshot(dir): dir must be the path of a new or empty directory");
  if (!machine->paused())
    Invalid(env, "snapshot VM", "the VM is not paused: await vm.pause() before vm.snapshot()");
  auto* w = new SnapshotWorker(handle, machine, info[0].As<Napi::String>().Utf8Value());
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

}  // namespace vmlet::addon
