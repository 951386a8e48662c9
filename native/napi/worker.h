// Runs native work on a libuv worker thread and settles a Promise with the result.
// No C++ exception crosses into JavaScript: every exception becomes a rejected Promise
// whose error carries a `code` (ABORTED, INVALID_ARGUMENT, OUT_OF_MEMORY, DEVICE_FAILED or NATIVE) that lib/native.ts maps.
#pragma once
#include <napi.h>

#include <functional>
#include <stdexcept>
#include <string>

#include "model/model.h"

namespace rf::napi {

inline Napi::Error make_error(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

// Runs fn, turning C++ exceptions into JavaScript ones (for synchronous methods).
template <typename Fn>
auto guard(Napi::Env env, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::invalid_argument& e) {
    throw make_error(env, "INVALID_ARGUMENT", e.what());
  } catch (const std::out_of_range& e) {
    throw make_error(env, "INVALID_ARGUMENT", e.what());
  } catch (const OutOfMemory& e) {
    throw make_error(env, "OUT_OF_MEMORY", e.what());
  } catch (const DeviceFailed& e) {
    throw make_error(env, "DEVICE_FAILED", e.what());
  } catch (const std::bad_alloc&) {
    throw make_error(env, "OUT_OF_MEMORY", "out of host memory");
  } catch (const std::exception& e) {
    throw make_error(env, "NATIVE", e.what());
  } catch (...) {
    throw make_error(env, "NATIVE", "unknown native error");
  }
}

class PromiseWorker : public Napi::AsyncWorker {
 public:
  using Work = std::function<void()>;                   // worker thread; may throw
  using Result = std::function<Napi::Value(Napi::Env)>;  // main thread, after work succeeded

  PromiseWorker(Napi::Env env, Work work, Result result)
      : Napi::AsyncWorker(env, "redflag"), deferred_(Napi::Promise::Deferred::New(env)),
        work_(std::move(work)), result_(std::move(result)) {}

  Napi::Promise promise() const { return deferred_.Promise(); }

  // Queues the worker and returns its promise.
  static Napi::Promise start(Napi::Env env, Work work, Result result) {
    auto* w = new PromiseWorker(env, std::move(work), std::move(result));
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  }

 protected:
  void Execute() override {
    try {
      work_();
    } catch (const Cancelled& e) {
      fail("ABORTED", e.what());
    } catch (const std::invalid_argument& e) {
      fail("INVALID_ARGUMENT", e.what());
    } catch (const std::out_of_range& e) {
      fail("INVALID_ARGUMENT", e.what());
    } catch (const OutOfMemory& e) {
      fail("OUT_OF_MEMORY", e.what());
    } catch (const DeviceFailed& e) {
      fail("DEVICE_FAILED", e.what());
    } catch (const std::bad_alloc&) {
      fail("OUT_OF_MEMORY", "out of host memory");
    } catch (const std::exception& e) {
      fail("NATIVE", e.what());
    } catch (...) {
      fail("NATIVE", "unknown native error");
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    try {
      deferred_.Resolve(result_(env));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (const std::exception& e) {
      deferred_.Reject(make_error(env, "NATIVE", e.what()).Value());
    }
  }
  void OnError(const Napi::Error&) override {
    deferred_.Reject(make_error(Env(), code_.c_str(), message_).Value());
  }

 private:
  void fail(const char* code, const std::string& message) {
    code_ = code;
    message_ = message;
    SetError(message);
  }

  Napi::Promise::Deferred deferred_;
  Work work_;
  Result result_;
  std::string code_ = "NATIVE", message_;
};

}  // namespace rf::napi
