#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "addon/registry.h"
#include "core/error.h"

namespace vmlet::addon {

namespace {
std::vector<std::pair<const char*, InitFn>>& Inits() {
  static std::vector<std::pair<const char*, InitFn>> inits;
  return inits;
}
}  // namespace

Registrar::Registrar(const char* name, InitFn fn) { Inits().emplace_back(name, fn); }

void ThrowVmmError(Napi::Env env, const std::exception& e) {
  Napi::Error err = Napi::Error::New(env, e.what());
  if (auto* v = dynamic_cast<const VmmError*>(&e)) {
    err.Set("name", Napi::String::New(env, ErrorKindName(v->kind())));
    err.Set("op", Napi::String::New(env, v->op()));
    if (v->error_number() != 0) {
      err.Set("errno", Napi::Number::New(env, v->error_number()));
      const char* code = strerrorname_np(v->error_number());
      if (code) err.Set("code", Napi::String::New(env, code));
    }
  }
  throw err;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  for (auto& [name, fn] : Inits()) fn(env, exports);
  return exports;
}

}  // namespace vmlet::addon

// NODE_API_MODULE pastes the name into an identifier: it must be unqualified.
static Napi::Object InitVmlet(Napi::Env env, Napi::Object exports) { return vmlet::addon::Init(env, exports); }
NODE_API_MODULE(vmlet, InitVmlet)
