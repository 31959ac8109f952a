#include "addon/disk_specs.h"

#include "addon/registry.h"
#include "core/error.h"

namespace vmlet::addon {

std::vector<kvm::DiskSpec> ParseDiskSpecs(Napi::Env env, Napi::Value disks, const std::string& op, const std::string& owner) {
  auto invalid = [&](const std::string& msg) { ThrowVmmError(env, VmmError(ErrorKind::InvalidArgument, op, msg)); };
  std::vector<kvm::DiskSpec> out;
  if (disks.IsUndefined()) return out;
  if (!disks.IsArray()) invalid(owner + ".disks must be an array");
  Napi::Array a = disks.As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); i++) {
    const std::string at = owner + ".disks[" + std::to_string(i) + "]";
    Napi::Value d = a.Get(i);
    if (!d.IsObject()) invalid(at + " must be an object");
    Napi::Object o = d.As<Napi::Object>();
    kvm::DiskSpec spec;
    Napi::Value empty = o.Get("empty");
    if (!empty.IsUndefined() && !empty.IsBoolean()) invalid(at + ".empty must be a boolean");
    spec.empty = empty.IsBoolean() && empty.As<Napi::Boolean>().Value();
    // An empty slot has no path: MakeVirtioBlk refuses one given beside `empty`.
    Napi::Value path = o.Get("path");
    if (!path.IsUndefined() || !spec.empty) {
      if (!path.IsString() || path.As<Napi::String>().Utf8Value().empty()) invalid(at + ".path must be a non-empty string");
      spec.path = path.As<Napi::String>().Utf8Value();
    }
    Napi::Value ro = o.Get("readOnly");
    if (!ro.IsUndefined() && !ro.IsBoolean()) invalid(at + ".readOnly must be a boolean");
    spec.read_only = ro.IsBoolean() && ro.As<Napi::Boolean>().Value();
    Napi::Value id = o.Get("id");
    if (!id.IsUndefined() && !id.IsString()) invalid(at + ".id must be a string");
    if (id.IsString()) spec.id = id.As<Napi::String>().Utf8Value();
    out.push_back(spec);
  }
  return out;
}

}  // namespace vmlet::addon
