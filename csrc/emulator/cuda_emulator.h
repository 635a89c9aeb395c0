// fastkd's CUDA emulator: runs the kernel sources (csrc/<op>/<op>.cu, csrc/common/nodes.cu) on the CPU, unchanged.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread, scheduled in order of its linear
// thread index until it finishes or waits at a barrier: __syncthreads() (all live threads of the block) or a
// warp shuffle (the lanes its mask names). Blocks run one after another, in order of their linear index. The
// order is fixed, so a kernel behaves the same on every run; FASTKD_EMULATOR_ORDER=random runs the blocks in
// a random order, each sweep of a block's threads in a random order, and switches threads at random memory
// accesses (seeded by FASTKD_EMULATOR_SEED, default 0), so that an order dependence shows up as different
// outputs.
//
// What it checks, as the driver and compute-sanitizer would on a GPU (each failure is a
// fastkd::emu::EmulationError, a std::runtime_error, thrown by the launch and naming the kernel):
//   * the launch configuration against CUDA's limits (common/launch_limits.h), static shared memory included;
//   * shared memory (FASTKD_SHARED arrays) element by element: a thread reading or writing an element that
//     another thread wrote, or writing one another thread read, with no __syncthreads() between them, is a
//     race (a missing barrier shows up this way); and indices out of bounds;
//   * global memory, through the pointers kernels take as fastkd::global_ptr<T> (a GlobalPtr here): within one
//     launch, an address written by two threads of different blocks, or by two threads of one block with no
//     __syncthreads() between, read by one thread after another block wrote it (or another thread of its
//     block, with no barrier between), or written after another block read it through a writable pointer;
//     reported with the launch argument it lies in and its element index;
//   * __syncthreads() reached by the threads of a block at different places, or a block where some threads
//     wait at a barrier that the others can never reach (a deadlock on a GPU);
//   * shuffles: the calling lane must be in the mask; every lane the mask names must exist and reach the
//     shuffle (one that has exited is an error, not a stale value); the lane read must be in the mask.
//
// With FASTKD_EMULATOR_PROFILE=1 every launch prints one line to stderr, as a GPU profiler would count:
// grid, block, static shared bytes; shared-memory requests (one per warp-wide access) and their wavefronts
// (32 banks of 4 bytes: a request takes as many wavefronts as the most distinct 4-byte words any one bank
// serves; an 8-byte access covers two banks), with the ideal and the excess (bank conflicts); global-memory
// requests and the 32-byte sectors they touch, loads and stores apart, with the ideal sectors per request.
// A warp-wide access is the k-th execution of one access in the source by the lanes of a warp. Grids of more
// than 64 blocks are sampled: every ceil(blocks / 64)-th block is profiled (all are checked).
//
// Only what the kernels use is emulated: threadIdx/blockIdx/blockDim/gridDim (x, y, z), __syncthreads,
// __shfl_down_sync / __shfl_xor_sync, the FP64 mma.sync m8n8k4 (through common/mma.cuh), and the __half /
// __nv_bfloat16 storage types with their float conversions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/launch_limits.h"

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The accessors kernels call at every access are inlined into the kernel, and each calls one out-of-line hook:
// the hook's return address tells the access sites of the source apart (the profile groups a warp's accesses
// by site).
#define FASTKD_EMU_INLINE inline __attribute__((always_inline))
#define FASTKD_EMU_HOOK __attribute__((noinline))

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
// Exchanges one 8-byte value among the lanes of the calling warp that `mask` names: returns the value lane
// `source_lane` put in (the caller's own value if `source_lane` is outside the warp, as __shfl_down_sync past
// the last lane returns).
std::uint64_t warp_exchange(std::uint64_t value, int source_lane, unsigned mask);
// mma.sync.aligned.m8n8k4.row.col.f64 with D = C: d += A B for the 8 x 4 matrix A and the 4 x 8 matrix B
// whose elements the 32 lanes of the warp hold (a = A[lane / 4][lane % 4], b = B[lane % 4][lane / 4]);
// d[i] is D[lane / 4][2 (lane % 4) + i]. Every lane of the warp must reach it (a full-warp collective); each
// element is c + the products in the order of k, each added with one rounding (fma).
void warp_mma_m8n8k4_f64(double a, double b, double (&d)[2]);
std::uint64_t block_epoch();  // number of __syncthreads() the current block has passed
[[noreturn]] void fail(const std::string& message);

// Launch arguments that hold global memory, by name: the regions race reports name addresses by.
struct Region {
  std::string name;
  std::uintptr_t begin;
  std::size_t element_bytes;
};
using Regions = std::vector<Region>;

// The profile lines of the launches since the last call (FASTKD_EMULATOR_PROFILE=1), oldest first; each was
// also printed to stderr.
std::vector<std::string> take_profile();

// Runs `body` as every thread of every block of the launch, checking it as the header says.
void run_launch(const char* kernel, const LaunchExtent& grid, const LaunchExtent& block, Regions regions,
                const std::function<void()>& body);

// The hooks of every global-memory access (GlobalPtr), and of shared-memory accesses (SharedArray).
FASTKD_EMU_HOOK void global_load(const void* address, std::size_t bytes, bool writable_pointer);
FASTKD_EMU_HOOK void global_store(const void* address, std::size_t bytes);
void shared_access(const void* site, std::size_t offset, std::size_t bytes, bool store);

// A global-memory pointer as kernels take it (fastkd::global_ptr<T>): a T* whose every access the emulator
// checks and profiles. Converts from T* (launch arguments, nullptr), never back.
template <typename T>
class GlobalPtr;

template <typename T>
class GlobalRef {  // an element of writable global memory
 public:
  explicit GlobalRef(T* pointer) : pointer_(pointer) {}
  FASTKD_EMU_INLINE operator T() const {
    global_load(pointer_, sizeof(T), true);
    return *pointer_;
  }
  FASTKD_EMU_INLINE GlobalRef& operator=(const T& value) {
    global_store(pointer_, sizeof(T));
    *pointer_ = value;
    return *this;
  }
  FASTKD_EMU_INLINE GlobalRef& operator=(const GlobalRef& other) { return *this = static_cast<T>(other); }
  FASTKD_EMU_INLINE GlobalRef& operator+=(const T& value) { return *this = static_cast<T>(*this) + value; }

 private:
  T* pointer_;
};

template <typename T>
class GlobalPtr {
 public:
  using Element = std::conditional_t<std::is_const<T>::value, std::remove_const_t<T>, GlobalRef<T>>;

  GlobalPtr() = default;
  GlobalPtr(T* pointer) : pointer_(pointer) {}  // NOLINT: launch arguments convert implicitly
  GlobalPtr(std::nullptr_t) {}                  // NOLINT
  template <typename U, typename = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  GlobalPtr(const GlobalPtr<U>& other) : pointer_(other.get()) {}  // NOLINT: T* to const T*, as pointers do

  T* get() const { return pointer_; }
  explicit operator bool() const { return pointer_ != nullptr; }
  friend bool operator==(const GlobalPtr& p, std::nullptr_t) { return p.pointer_ == nullptr; }
  friend bool operator!=(const GlobalPtr& p, std::nullptr_t) { return p.pointer_ != nullptr; }

  template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
  GlobalPtr operator+(I offset) const {
    return GlobalPtr(pointer_ + offset);
  }
  template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
  GlobalPtr operator-(I offset) const {
    return GlobalPtr(pointer_ - offset);
  }

  template <typename I, typename = std::enable_if_t<std::is_integral<I>::value>>
  FASTKD_EMU_INLINE Element operator[](I index) const {
    T* element = pointer_ + index;
    if constexpr (std::is_const<T>::value) {
      global_load(element, sizeof(T), false);
      return *element;
    } else {
      return GlobalRef<T>(element);
    }
  }
  FASTKD_EMU_INLINE Element operator*() const { return (*this)[0]; }

 private:
  T* pointer_ = nullptr;
};

// Adds the regions of one launch argument: a pointer, a GlobalPtr, or a struct for which an
// `emulator_pointers(argument, visit)` is found by argument-dependent lookup (visit(field name, pointer) for
// each pointer it holds, as nodes::Nodes has).
template <typename T>
void add_region(Regions& regions, const std::string& name, const T* pointer) {
  if (pointer != nullptr) regions.push_back({name, reinterpret_cast<std::uintptr_t>(pointer), sizeof(T)});
}
template <typename T>
void add_region(Regions& regions, const std::string& name, const GlobalPtr<T>& pointer) {
  add_region(regions, name, pointer.get());
}
template <typename A, typename = void>
struct HasPointers : std::false_type {};
template <typename A>
struct HasPointers<A, std::void_t<decltype(emulator_pointers(std::declval<const A&>(),
                                                               std::declval<void (*)(const char*, const void*)>()))>>
    : std::true_type {};
template <typename A>
void add_regions(Regions& regions, const std::string& name, const A& argument) {
  if constexpr (std::is_pointer<A>::value) {
    add_region(regions, name, argument);
  } else if constexpr (HasPointers<A>::value) {
    emulator_pointers(argument, [&](const char* field, const auto& pointer) {
      add_region(regions, name + "." + field, pointer);
    });
  }
}

std::vector<std::string> split_arguments(const char* argument_names);  // "a, f(b, c), d" -> a | f(b, c) | d

template <typename... Args>
void launch(const char* kernel, const LaunchExtent& grid, const LaunchExtent& block, const char* argument_names,
            const std::function<void()>& body, const Args&... args) {
  const std::vector<std::string> names = split_arguments(argument_names);
  Regions regions;
  std::size_t position = 0;
  ((add_regions(regions, position < names.size() ? names[position] : "argument " + std::to_string(position), args),
    ++position),
   ...);
  run_launch(kernel, grid, block, std::move(regions), body);
}

template <typename T>
T shfl_down(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value wider than 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const int lane = current().linear % 32;
  bits = warp_exchange(bits, lane + static_cast<int>(delta), mask);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
T shfl_xor(unsigned mask, T value, unsigned lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value wider than 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const int lane = current().linear % 32;
  bits = warp_exchange(bits, lane ^ static_cast<int>(lane_mask), mask);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// A __shared__ array of N elements of T with per-element race tracking, at byte `offset` of its block's shared
// memory (for the banks). Accesses go through Ref.
template <typename T, std::size_t N>
class SharedArray {
 public:
  SharedArray(const char* name, std::size_t offset) : name_(name), offset_(offset) {
    for (std::size_t i = 0; i < N; ++i) {
      writer_[i] = reader_[i] = second_reader_[i] = kNobody;
    }
  }

  class Ref {
   public:
    Ref(SharedArray* array, std::size_t index) : array_(array), index_(index) {}
    FASTKD_EMU_INLINE operator T() const {
      array_->on_read(index_);
      return array_->data_[index_];
    }
    FASTKD_EMU_INLINE Ref& operator=(T value) {
      array_->on_write(index_);
      array_->data_[index_] = value;
      return *this;
    }
    FASTKD_EMU_INLINE Ref& operator=(const Ref& other) { return *this = static_cast<T>(other); }
    FASTKD_EMU_INLINE Ref& operator+=(T value) { return *this = static_cast<T>(*this) + value; }

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
  FASTKD_EMU_HOOK void on_read(std::size_t i) {
    shared_access(__builtin_return_address(0), offset_ + i * sizeof(T), sizeof(T), false);
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
  FASTKD_EMU_HOOK void on_write(std::size_t i) {
    shared_access(__builtin_return_address(0), offset_ + i * sizeof(T), sizeof(T), true);
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
  std::size_t offset_;
  T data_[N] = {};
  int writer_[N];
  int reader_[N];
  int second_reader_[N];
  std::uint64_t write_epoch_[N] = {};
  std::uint64_t read_epoch_[N] = {};
};

// The shared array of the running block declared at `site` (one per declaration in the source), created by
// the first thread that reaches the declaration and destroyed when the block ends. `data_bytes` (N
// sizeof(T)) counts against the block's 48 KiB of static shared memory.
void* block_shared(const void* site, std::size_t bytes, std::size_t data_bytes,
                   void* (*create)(void*, const char*, std::size_t), void (*destroy)(void*), const char* name);

template <typename T, std::size_t N>
SharedArray<T, N>& shared_array(const void* site, const char* name) {
  using Array = SharedArray<T, N>;
  return *static_cast<Array*>(block_shared(
      site, sizeof(Array), N * sizeof(T),
      [](void* memory, const char* n, std::size_t offset) -> void* { return new (memory) Array(n, offset); },
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

}  // namespace emu
}  // namespace fastkd

using fastkd::emu::__bfloat162float;
using fastkd::emu::__float2bfloat16_rn;
using fastkd::emu::__float2half_rn;
using fastkd::emu::__half;
using fastkd::emu::__half2float;
using fastkd::emu::__nv_bfloat16;

#define threadIdx (::fastkd::emu::current().thread_idx)
#define blockIdx (::fastkd::emu::current().block_idx)
#define blockDim (::fastkd::emu::current().block_dim)
#define gridDim (::fastkd::emu::current().grid_dim)
#define __syncthreads() ::fastkd::emu::syncthreads(__FILE__, __LINE__)
#define __shfl_down_sync(mask, value, delta) ::fastkd::emu::shfl_down((mask), (value), (delta))
#define __shfl_xor_sync(mask, value, lane_mask) ::fastkd::emu::shfl_xor((mask), (value), (lane_mask))
