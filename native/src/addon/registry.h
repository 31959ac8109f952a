// Each binding file registers its exports here, so adding a binding touches
// one file: the module initialiser never names them.
#pragma once
#include <napi.h>

namespace vmlet::addon {

using InitFn = void (*)(Napi::Env env, Napi::Object exports);

struct Registrar {
  Registrar(const char* name, InitFn fn);
};

// Throws a JS Error whose .name is the typed error class (KvmError, BootError,
// ...) and whose .code is the errno name where there is one.
[[noreturn]] void ThrowVmmError(Napi::Env env, const std::exception& e);

}  // namespace vmlet::addon
