// fastkd's CUDA emulator: fibers for CUDA threads, barriers, warp exchange, shared-memory bookkeeping.
// See cuda_emulator.h for what it emulates and checks.
#include "cuda_emulator.h"

#include <ucontext.h>

#include <algorithm>
#include <exception>
#include <memory>
#include <new>
#include <vector>

namespace fastkd {
namespace emu {
namespace {

constexpr std::size_t kStackBytes = 128 * 1024;
constexpr int kWarpSize = 32;

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  State state = State::kReady;
  ThreadContext thread;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::uint64_t warp_value = 0;
};

struct SharedSlot {
  const void* site;
  void* memory;
  void (*destroy)(void*);
};

}  // namespace

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  std::uint64_t epoch = 0;
  int running = -1;
  std::exception_ptr error;
  std::vector<SharedSlot> shared;
  const std::function<void()>* body = nullptr;

  ~Block() {
    for (SharedSlot& slot : shared) {
      slot.destroy(slot.memory);
      ::operator delete(slot.memory);
    }
  }
};

namespace {

thread_local Block* g_block = nullptr;
// Fiber stacks, kept across launches on this OS thread.
thread_local std::vector<std::unique_ptr<char[]>> g_stacks;

Fiber& running_fiber() {
  if (g_block == nullptr || g_block->running < 0) {
    throw EmulationError("a CUDA built-in (threadIdx, __syncthreads, a shuffle, shared memory) was used outside a "
                         "kernel launched through the emulator");
  }
  return g_block->fibers[static_cast<std::size_t>(g_block->running)];
}

// Gives control back to the scheduler until it makes this fiber ready again.
void wait(State state) {
  Fiber& fiber = running_fiber();
  fiber.state = state;
  swapcontext(&fiber.context, &g_block->scheduler);
}

void fiber_main() {
  Block* block = g_block;
  try {
    (*block->body)();
  } catch (...) {
    if (!block->error) block->error = std::current_exception();
  }
  block->fibers[static_cast<std::size_t>(block->running)].state = State::kDone;
  // returning resumes uc_link, the scheduler
}

std::string where(const Fiber& fiber) {
  switch (fiber.state) {
    case State::kAtBlockBarrier:
      return "__syncthreads() at " + std::string(fiber.barrier_file) + ":" + std::to_string(fiber.barrier_line);
    case State::kAtWarpBarrier:
      return "a warp shuffle";
    case State::kDone:
      return "exited";
    default:
      return "running";
  }
}

// Releases the warps whose live lanes all wait at a shuffle; true if any was released.
bool release_warps(Block& block) {
  bool released = false;
  const std::size_t threads = block.fibers.size();
  for (std::size_t first = 0; first < threads; first += kWarpSize) {
    const std::size_t last = std::min(threads, first + kWarpSize);
    bool any = false, all = true;
    for (std::size_t i = first; i < last; ++i) {
      const State state = block.fibers[i].state;
      if (state == State::kDone) continue;
      any = true;
      all = all && state == State::kAtWarpBarrier;
    }
    if (any && all) {
      for (std::size_t i = first; i < last; ++i) {
        if (block.fibers[i].state == State::kAtWarpBarrier) block.fibers[i].state = State::kReady;
      }
      released = true;
    }
  }
  return released;
}

// Releases the block barrier if every live thread waits at the same __syncthreads(); false if none is
// live. Anything else is a deadlock on a GPU (or undefined behaviour) and is reported.
bool release_block(Block& block) {
  const Fiber* first_waiting = nullptr;
  bool any_live = false;
  for (const Fiber& fiber : block.fibers) {
    if (fiber.state == State::kDone) continue;
    any_live = true;
    if (fiber.state != State::kAtBlockBarrier) {
      fail("deadlock: thread " + std::to_string(fiber.thread.linear) + " waits at " + where(fiber) +
           " while other threads of its block wait elsewhere");
    }
    if (first_waiting == nullptr) {
      first_waiting = &fiber;
    } else if (fiber.barrier_line != first_waiting->barrier_line ||
               std::string(fiber.barrier_file) != first_waiting->barrier_file) {
      fail("divergent __syncthreads(): thread " + std::to_string(first_waiting->thread.linear) + " waits at " +
           where(*first_waiting) + ", thread " + std::to_string(fiber.thread.linear) + " at " + where(fiber));
    }
  }
  if (!any_live) return false;
  ++block.epoch;
  for (Fiber& fiber : block.fibers) {
    if (fiber.state == State::kAtBlockBarrier) fiber.state = State::kReady;
  }
  return true;
}

void run_block(Block& block) {
  while (true) {
    for (std::size_t i = 0; i < block.fibers.size(); ++i) {
      if (block.fibers[i].state != State::kReady) continue;
      block.running = static_cast<int>(i);
      swapcontext(&block.scheduler, &block.fibers[i].context);
      block.running = -1;
      if (block.error) std::rethrow_exception(block.error);  // the other fibers are abandoned
    }
    if (release_warps(block)) continue;
    if (!release_block(block)) return;  // every thread has exited
  }
}

}  // namespace

ThreadContext& current() { return running_fiber().thread; }

void fail(const std::string& message) { throw EmulationError("CUDA emulator: " + message); }

void syncthreads(const char* file, int line) {
  Fiber& fiber = running_fiber();
  fiber.barrier_file = file;
  fiber.barrier_line = line;
  wait(State::kAtBlockBarrier);
}

std::uint64_t block_epoch() {
  running_fiber();
  return g_block->epoch;
}

std::uint64_t warp_exchange(std::uint64_t value, int source_lane) {
  Fiber& fiber = running_fiber();
  fiber.warp_value = value;
  wait(State::kAtWarpBarrier);  // every live lane has published its value
  const int warp_start = fiber.thread.linear / kWarpSize * kWarpSize;
  const int source = warp_start + source_lane;
  std::uint64_t result = value;
  if (source_lane >= 0 && source_lane < kWarpSize && source < static_cast<int>(g_block->fibers.size())) {
    result = g_block->fibers[static_cast<std::size_t>(source)].warp_value;
  }
  wait(State::kAtWarpBarrier);  // every lane has read before any publishes again
  return result;
}

void* block_shared(const void* site, std::size_t bytes, void* (*create)(void*, const char*),
                   void (*destroy)(void*), const char* name) {
  running_fiber();
  for (SharedSlot& slot : g_block->shared) {
    if (slot.site == site) return slot.memory;
  }
  void* memory = ::operator new(bytes);
  create(memory, name);
  g_block->shared.push_back({site, memory, destroy});
  return memory;
}

void launch(dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  if (g_block != nullptr) fail("a kernel launched another kernel");
  const std::size_t threads = static_cast<std::size_t>(block_dim.x) * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024) fail("blockDim has " + std::to_string(threads) + " threads (1 to 1024)");
  while (g_stacks.size() < threads) g_stacks.emplace_back(new char[kStackBytes]);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block block;
        block.body = &body;
        block.fibers.resize(threads);
        for (std::size_t i = 0; i < threads; ++i) {
          Fiber& fiber = block.fibers[i];
          const unsigned linear = static_cast<unsigned>(i);
          fiber.thread.thread_idx = dim3(linear % block_dim.x, linear / block_dim.x % block_dim.y,
                                         linear / (block_dim.x * block_dim.y));
          fiber.thread.block_idx = dim3(bx, by, bz);
          fiber.thread.block_dim = block_dim;
          fiber.thread.grid_dim = grid;
          fiber.thread.linear = static_cast<int>(i);
          fiber.thread.block = &block;
          getcontext(&fiber.context);
          fiber.context.uc_stack.ss_sp = g_stacks[i].get();
          fiber.context.uc_stack.ss_size = kStackBytes;
          fiber.context.uc_link = &block.scheduler;
          makecontext(&fiber.context, fiber_main, 0);
        }
        g_block = &block;
        try {
          run_block(block);
        } catch (...) {
          g_block = nullptr;
          throw;
        }
        g_block = nullptr;
      }
    }
  }
}

namespace {

std::uint16_t float_to_half_bits(float value) {
  std::uint32_t x;
  std::memcpy(&x, &value, sizeof(x));
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  std::uint32_t mantissa = x & 0x7fffffu;
  const int exponent = static_cast<int>((x >> 23) & 0xffu);
  if (exponent == 255) return static_cast<std::uint16_t>(sign | 0x7c00u | (mantissa ? 0x200u : 0u));
  const int e = exponent - 127 + 15;
  if (e >= 31) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (e <= 0) {  // a subnormal half (or 0): m * 2^-24 with m = (1.mantissa) * 2^(e - 14 + 23 - 23)
    if (e < -10) return static_cast<std::uint16_t>(sign);
    mantissa |= 0x800000u;
    const int shift = 14 - e;
    std::uint32_t bits = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (bits & 1u))) ++bits;
    return static_cast<std::uint16_t>(sign | bits);
  }
  std::uint32_t bits = sign | (static_cast<std::uint32_t>(e) << 10) | (mantissa >> 13);
  const std::uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (bits & 1u))) ++bits;  // a carry rounds up into the exponent
  return static_cast<std::uint16_t>(bits);
}

float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  std::uint32_t x;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // 2^-24
    std::memcpy(&x, &magnitude, sizeof(x));
    x |= sign;
  } else if (exponent == 31) {
    x = sign | 0x7f800000u | (mantissa << 13);
  } else {
    x = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &x, sizeof(value));
  return value;
}

}  // namespace

__half::__half(float value) : bits_(float_to_half_bits(value)) {}
__half::operator float() const { return half_bits_to_float(bits_); }

__nv_bfloat16::__nv_bfloat16(float value) {
  std::uint32_t x;
  std::memcpy(&x, &value, sizeof(x));
  if ((x & 0x7f800000u) == 0x7f800000u && (x & 0x7fffffu)) {
    bits_ = static_cast<std::uint16_t>((x >> 16) | 0x40u);  // a quiet NaN
  } else {
    x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
    bits_ = static_cast<std::uint16_t>(x >> 16);
  }
}
__nv_bfloat16::operator float() const {
  const std::uint32_t x = static_cast<std::uint32_t>(bits_) << 16;
  float value;
  std::memcpy(&value, &x, sizeof(value));
  return value;
}

}  // namespace emu
}  // namespace fastkd
