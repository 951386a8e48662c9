// Benchmark entry points for bench/ (machine ceilings and kernel timings), run off the event loop.
#pragma once
#include <napi.h>

namespace rf::napi {
void init_bench(Napi::Env env, Napi::Object exports);
}
