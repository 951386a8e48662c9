// NCCL behind cuda/collective.h; without NCCL (RF_HAVE_NCCL unset) every call throws.
#include "cuda/collective.h"

#include <stdexcept>
#include <string>

#if RF_HAVE_NCCL
#include <nccl.h>

#include "cuda/error.h"
#endif

namespace rf::cuda {

#if RF_HAVE_NCCL

namespace {

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw std::runtime_error(std::string("NCCL ") + what + ": " + ncclGetErrorString(r));
}

}  // namespace

struct Collective::Impl {
  ncclComm_t comm = nullptr;
};

bool collective_available() { return true; }

std::string new_collective_id() {
  ncclUniqueId id;
  check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (int i = 0; i < NCCL_UNIQUE_ID_BYTES; ++i) {
    const unsigned char b = static_cast<unsigned char>(id.internal[i]);
    out += hex[b >> 4];
    out += hex[b & 15];
  }
  return out;
}

Collective::Collective(const std::string& id, int rank, int world, int device) : impl_(new Impl), rank_(rank), world_(world) {
  if (world < 1 || rank < 0 || rank >= world)
    throw std::invalid_argument("data-parallel rank " + std::to_string(rank) + " of world size " + std::to_string(world));
  if (id.size() != 2 * NCCL_UNIQUE_ID_BYTES) throw std::invalid_argument("a collective id is " + std::to_string(2 * NCCL_UNIQUE_ID_BYTES) + " hex digits");
  ncclUniqueId uid;
  for (int i = 0; i < NCCL_UNIQUE_ID_BYTES; ++i) {
    const std::string byte = id.substr(size_t(2 * i), 2);
    size_t used = 0;
    int v = -1;
    try {
      v = std::stoi(byte, &used, 16);
    } catch (...) {
    }
    if (used != 2 || v < 0) throw std::invalid_argument("a collective id is hex digits only");
    uid.internal[i] = static_cast<char>(v);
  }
  check(cudaSetDevice(device), "cudaSetDevice");
  check_nccl(ncclCommInitRank(&impl_->comm, world, uid, rank), "ncclCommInitRank");
}

Collective::~Collective() {
  if (impl_->comm) ncclCommDestroy(impl_->comm);
}

void Collective::all_reduce_sum(float* data, long n, cudaStream_t stream) {
  if (n > 0) check_nccl(ncclAllReduce(data, data, size_t(n), ncclFloat32, ncclSum, impl_->comm, stream), "ncclAllReduce");
}

#else

struct Collective::Impl {};

namespace {
[[noreturn]] void missing() {
  throw std::invalid_argument("data-parallel training needs NCCL: this CUDA build was made without it (install the CUDA "
                              "toolkit's NCCL or the pip wheel nvidia-nccl-cu12, or set RF_NCCL_ROOT, then rebuild)");
}
}  // namespace

bool collective_available() { return false; }
std::string new_collective_id() { missing(); }
Collective::Collective(const std::string&, int, int, int) : rank_(0), world_(1) { missing(); }
Collective::~Collective() = default;
void Collective::all_reduce_sum(float*, long, cudaStream_t) { missing(); }

#endif

}  // namespace rf::cuda
