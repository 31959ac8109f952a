// Promise-returning work on libuv's pool, shared by the bindings: errors
// reach JS as typed VmmErrors (.name KvmError, SnapshotError, ..., .op, .code).
#pragma once
#include <napi.h>

#include <cstring>
#include <string>

#include "core/error.h"

namespace vmlet::addon {

struct ErrorInfo {
  std::string message;
  std::string name = "VmmError";
  std::string op;
  int err = 0;
};

inline ErrorInfo Capture(const std::exception& e) {
  ErrorInfo info;
  info.message = e.what();
  if (auto* v = dynamic_cast<const VmmError*>(&e)) {
    info.name = ErrorKindName(v->kind());
    info.op = v->op();
    info.err = v->error_number();
  }
  return info;
}

inline Napi::Value ToJsError(Napi::Env env, const ErrorInfo& info) {
  Napi::Error err = Napi::Error::New(env, info.message);
  err.Set("name", Napi::String::New(env, info.name));
  if (!info.op.empty()) err.Set("op", Napi::String::New(env, info.op));
  if (info.err) {
    err.Set("errno", Napi::Number::New(env, info.err));
    if (const char* code = strerrorname_np(info.err)) err.Set("code", Napi::String::New(env, code));
  }
  return err.Value();
}

// An AsyncWorker that settles a promise, rejecting with a typed VmmError.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  explicit PromiseWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  virtual void Work() = 0;
  virtual Napi::Value Result(Napi::Env env) = 0;
  void Execute() override {
    try {
      Work();
    } catch (const std::exception& e) {
      error_ = Capture(e);
      SetError(error_.message);
    }
  }
  void OnOK() override { deferred_.Resolve(Result(Env())); }
  void OnError(const Napi::Error&) override { deferred_.Reject(ToJsError(Env(), error_)); }

  Napi::Promise::Deferred deferred_;
  ErrorInfo error_;
};

}  // namespace vmlet::addon
