// fastkd's CUDA emulator: runs the kernel sources (csrc/<op>/<op>.cu, csrc/common/nodes.cu) on the CPU, unchanged.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread, scheduled in order of its linear
// thread index until it finishes or waits at a barrier: __syncthreads() (all live threads of the block) or a
// warp shuffle (all live lanes of the warp). Blocks run one after another. The order is fixed, so a kernel
// behaves the same on every run.
//
// What it checks, as compute-sanitizer's racecheck would on a GPU:
//   * shared memory (FASTKD_SHARED arrays) element by element: a thread reading or writing an element that
//     another thread wrote, or writing one another thread read, with no __syncthreads() between them, is a
//     race (a missing barrier shows up this way);
//   * shared-memory indices out of bounds;
//   * __syncthreads() reached by the threads of a block at different places, or a block where some threads
//     wait at a barrier that the others can never reach (a deadlock on a GPU).
// Each is reported as a fastkd::emu::EmulationError (a std::runtime_error) thrown by launch().
//
// Only what the kernels use is emulated: threadIdx/blockIdx/blockDim/gridDim (x, y, z), __syncthreads,
// __shfl_down_sync / __shfl_xor_sync over full warps of 32 lanes, atomicAdd (trivially atomic: one OS
// thread), and the __half / __nv_bfloat16 storage types with their float conversions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace fastkd {
namespace emu {

class EmulationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Block;

// What threadIdx and friends read: the context of the fiber that is running.
struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  Block* block = nullptr;
};

ThreadContext& current();
void syncthreads(const char* file, int line);
// Exchanges one 8-byte value among the lanes of the calling warp: returns the value lane `source` put in
// (own value if `source` is outside the warp or the block).
std::uint64_t warp_exchange(std::uint64_t value, int source_lane);
std::uint64_t block_epoch();  // number of __syncthreads() the current block has passed
[[noreturn]] void fail(const std::string& message);

void launch(dim3 grid, dim3 block, const std::function<void()>& body);

template <typename T>
T shfl_down(T value, unsigned delta) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value wider than 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const int lane = current().linear % 32;
  bits = warp_exchange(bits, lane + static_cast<int>(delta));
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
T shfl_xor(T value, unsigned mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value wider than 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const int lane = current().linear % 32;
  bits = warp_exchange(bits, lane ^ static_cast<int>(mask));
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// A __shared__ array of N elements of T with per-element race tracking. Accesses go through Ref.
template <typename T, std::size_t N>
class SharedArray {
 public:
  explicit SharedArray(const char* name) : name_(name) {
    for (std::size_t i = 0; i < N; ++i) {
      writer_[i] = reader_[i] = second_reader_[i] = kNobody;
    }
  }

  class Ref {
   public:
    Ref(SharedArray* array, std::size_t index) : array_(array), index_(index) {}
    operator T() const {
      array_->on_read(index_);
      return array_->data_[index_];
    }
    Ref& operator=(T value) {
      array_->on_write(index_);
      array_->data_[index_] = value;
      return *this;
    }
    Ref& operator=(const Ref& other) { return *this = static_cast<T>(other); }
    Ref& operator+=(T value) { return *this = static_cast<T>(*this) + value; }

   private:
    SharedArray* array_;
    std::size_t index_;
  };

  Ref operator[](std::size_t index) {
    if (index >= N) {
      fail(std::string("shared-memory index out of bounds: ") + name_ + "[" + std::to_string(index) + "] of " +
           std::to_string(N) + " elements, thread " + std::to_string(current().linear));
    }
    return Ref(this, index);
  }

 private:
  static constexpr int kNobody = -1;

  void race(const char* kind, std::size_t index, int other) const {
    fail(std::string("shared-memory race (") + kind + ") on " + name_ + "[" + std::to_string(index) + "]: threads " +
         std::to_string(other) + " and " + std::to_string(current().linear) +
         " access it with no __syncthreads() between");
  }
  void on_read(std::size_t i) {
    const int me = current().linear;
    const std::uint64_t epoch = block_epoch();
    if (write_epoch_[i] == epoch && writer_[i] != kNobody && writer_[i] != me) race("read after write", i, writer_[i]);
    if (read_epoch_[i] != epoch) {  // the first read since the last barrier
      reader_[i] = me;
      second_reader_[i] = kNobody;
      read_epoch_[i] = epoch;
    } else if (reader_[i] != me && second_reader_[i] == kNobody) {
      second_reader_[i] = me;  // two distinct readers are enough to name one that is not the writer
    }
  }
  void on_write(std::size_t i) {
    const int me = current().linear;
    const std::uint64_t epoch = block_epoch();
    if (write_epoch_[i] == epoch && writer_[i] != kNobody && writer_[i] != me) race("write after write", i, writer_[i]);
    if (read_epoch_[i] == epoch) {
      const int other = reader_[i] != me ? reader_[i] : second_reader_[i];
      if (other != kNobody) race("write after read", i, other);
    }
    writer_[i] = me;
    write_epoch_[i] = epoch;
  }

  const char* name_;
  T data_[N] = {};
  int writer_[N];
  int reader_[N];
  int second_reader_[N];
  std::uint64_t write_epoch_[N] = {};
  std::uint64_t read_epoch_[N] = {};
};

// The shared array of the running block declared at `site` (one per declaration in the source), created by
// the first thread that reaches the declaration and destroyed when the block ends.
void* block_shared(const void* site, std::size_t bytes, void* (*create)(void*, const char*),
                   void (*destroy)(void*), const char* name);

template <typename T, std::size_t N>
SharedArray<T, N>& shared_array(const void* site, const char* name) {
  using Array = SharedArray<T, N>;
  return *static_cast<Array*>(block_shared(
      site, sizeof(Array), [](void* memory, const char* n) -> void* { return new (memory) Array(n); },
      [](void* memory) { static_cast<Array*>(memory)->~Array(); }, name));
}

// 16-bit storage types. Only conversions are needed: the kernels compute in float or double.
class __half {
 public:
  __half() = default;
  __half(float value);  // round to nearest even
  operator float() const;

 private:
  std::uint16_t bits_ = 0;
};
class __nv_bfloat16 {
 public:
  __nv_bfloat16() = default;
  __nv_bfloat16(float value);  // round to nearest even
  operator float() const;

 private:
  std::uint16_t bits_ = 0;
};

inline float __half2float(__half value) { return static_cast<float>(value); }
inline __half __float2half_rn(float value) { return __half(value); }
inline float __bfloat162float(__nv_bfloat16 value) { return static_cast<float>(value); }
inline __nv_bfloat16 __float2bfloat16_rn(float value) { return __nv_bfloat16(value); }

inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

}  // namespace emu
}  // namespace fastkd

using fastkd::emu::__bfloat162float;
using fastkd::emu::__float2bfloat16_rn;
using fastkd::emu::__float2half_rn;
using fastkd::emu::__half;
using fastkd::emu::__half2float;
using fastkd::emu::__nv_bfloat16;
using fastkd::emu::atomicAdd;

#define threadIdx (::fastkd::emu::current().thread_idx)
#define blockIdx (::fastkd::emu::current().block_idx)
#define blockDim (::fastkd::emu::current().block_dim)
#define gridDim (::fastkd::emu::current().grid_dim)
#define __syncthreads() ::fastkd::emu::syncthreads(__FILE__, __LINE__)
#define __shfl_down_sync(mask, value, delta) ::fastkd::emu::shfl_down((value), (delta))
#define __shfl_xor_sync(mask, value, lane_mask) ::fastkd::emu::shfl_xor((value), (lane_mask))
