// convertLayer(input, output, options) -> Promise<{diffId, entries, tarBytes,
// squashfsBytes}>. The conversion runs on a libuv worker thread (plus the
// block processor's own threads): a layer takes seconds to minutes and must
// never block the event loop.
#include <napi.h>

#include <string>

#include "addon/registry.h"
#include "core/error.h"
#include "image/layer.h"

namespace vmlet::addon {

namespace {

class ConvertLayerWorker : public Napi::AsyncWorker {
 public:
  ConvertLayerWorker(Napi::Env env, std::string input, std::string output, image::LayerOptions opts)
      : Napi::AsyncWorker(env, "vmlet.convertLayer"),
        deferred_(Napi::Promise::Deferred::New(env)),
        input_(std::move(input)),
        output_(std::move(output)),
        opts_(opts) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      result_ = image::ConvertLayer(input_, output_, opts_);
    } catch (const VmmError& e) {
      kind_ = e.kind();
      op_ = e.op();
      errno_ = e.error_number();
      SetError(e.what());
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("diffId", result_.diff_id);
    o.Set("entries", Napi::Number::New(env, static_cast<double>(result_.entries)));
    o.Set("tarBytes", Napi::Number::New(env, static_cast<double>(result_.tar_bytes)));
    o.Set("squashfsBytes", Napi::Number::New(env, static_cast<double>(result_.squashfs_bytes)));
    deferred_.Resolve(o);
  }

  void OnError(const Napi::Error& e) override {
    Napi::Env env = Env();
    Napi::Object err = e.Value();
    err.Set("name", Napi::String::New(env, ErrorKindName(kind_)));
    if (!op_.empty()) err.Set("op", Napi::String::New(env, op_));
    if (errno_ != 0) {
      err.Set("errno", Napi::Number::New(env, errno_));
      if (const char* code = strerrorname_np(errno_)) err.Set("code", Napi::String::New(env, code));
    }
    deferred_.Reject(err);
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string input_;
  std::string output_;
  image::LayerOptions opts_;
  image::LayerConversion result_;
  ErrorKind kind_ = ErrorKind::Image;
  std::string op_;
  int errno_ = 0;
};

uint64_t Count(const Napi::Object& o, const char* key, uint64_t fallback) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsNumber()) throw VmmError(ErrorKind::InvalidArgument, std::string("convertLayer option ") + key, "must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > 9007199254740991.0 || d != static_cast<double>(static_cast<uint64_t>(d))) {
    throw VmmError(ErrorKind::InvalidArgument, std::string("convertLayer option ") + key,
                   "must be a non-negative integer, got " + v.ToString().Utf8Value());
  }
  return static_cast<uint64_t>(d);
}

Napi::Value ConvertLayer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString()) {
      throw VmmError(ErrorKind::InvalidArgument, "convertLayer", "expected (input: string, output: string, options?: object)");
    }
    image::LayerOptions opts;
    if (info.Length() > 2 && info[2].IsObject()) {
      Napi::Object o = info[2].As<Napi::Object>();
      Napi::Value c = o.Get("compression");
      if (!c.IsUndefined()) {
        if (!c.IsString()) throw VmmError(ErrorKind::InvalidArgument, "convertLayer option compression", "must be a string");
        opts.compression = image::ParseLayerCompression(c.As<Napi::String>().Utf8Value());
      }
      opts.limits.max_bytes = Count(o, "maxBytes", opts.limits.max_bytes);
      opts.limits.max_entries = Count(o, "maxEntries", opts.limits.max_entries);
      opts.limits.max_path_length = static_cast<uint32_t>(Count(o, "maxPathLength", opts.limits.max_path_length));
      opts.block_size = static_cast<uint32_t>(Count(o, "blockSize", opts.block_size));
      opts.workers = static_cast<unsigned>(Count(o, "workers", opts.workers));
      opts.compression_level = static_cast<unsigned>(Count(o, "level", opts.compression_level));
    }
    auto* worker = new ConvertLayerWorker(env, info[0].As<Napi::String>().Utf8Value(),
                                          info[1].As<Napi::String>().Utf8Value(), opts);
    Napi::Promise p = worker->Promise();
    worker->Queue();
    return p;
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    ThrowVmmError(env, e);
  }
}

void Init(Napi::Env env, Napi::Object exports) { exports.Set("convertLayer", Napi::Function::New(env, ConvertLayer)); }

static Registrar reg("layer", Init);

}  // namespace

}  // namespace vmlet::addon
