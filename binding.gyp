{
  # The default CPU addon. Kernels in native/kernels are compiled twice, once per
  # instruction set (namespaces rf::avx2 and rf::avx512); native/dispatch picks one
  # at run time, so one binary runs on any x86-64 with AVX2.
  "target_defaults": {
    # node-gyp's defaults build Release with -O3 only on some setups; set it explicitly (and
    # never list it under cflags!, which would strip ours too).
    "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
    "cflags_cc": ["-std=c++17", "-fexceptions", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-Wall", "-Wno-unused-function"],
    "cflags": ["-O3"],
    "include_dirs": ["native"],
    "defines": ["NDEBUG"]
  },
  "targets": [
    {
      "target_name": "rf_kernels_avx2",
      "type": "static_library",
      "sources": ["<!@(node scripts/list-sources.mjs kernels)"],
      "defines": ["RF_ISA=avx2"],
      "cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-fPIC"]
    },
    {
      "target_name": "rf_kernels_avx512",
      "type": "static_library",
      "sources": ["<!@(node scripts/list-sources.mjs kernels)"],
      "defines": ["RF_ISA=avx512"],
      "cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fPIC"]
    },
    {
      "target_name": "redflag",
      "sources": ["<!@(node scripts/list-sources.mjs core dispatch model napi)"],
      "dependencies": ["rf_kernels_avx2", "rf_kernels_avx512"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "NODE_ADDON_API_CPP_EXCEPTIONS"],
      "cflags_cc": ["-pthread"],
      "ldflags": ["-pthread"]
    }
  ]
}
