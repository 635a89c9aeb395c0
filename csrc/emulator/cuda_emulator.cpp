// fastkd's CUDA emulator: fibers for CUDA threads, barriers, warp exchange, shared- and global-memory
// bookkeeping, the random order and the profile. See cuda_emulator.h for what it emulates and checks.
#include "cuda_emulator.h"

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <tuple>
#include <unordered_map>

namespace fastkd {
namespace emu {
namespace {

constexpr std::size_t kStackBytes = 128 * 1024;
constexpr int kWarpSize = 32;
constexpr std::int64_t kProfiledBlocks = 64;  // at most this many blocks of a launch are profiled
constexpr std::size_t kSharedAlignment = 16;  // each FASTKD_SHARED array starts at a multiple of 16 bytes

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

// One warp-wide access is grouped from the lanes' accesses by (kind, warp, site, occurrence).
enum Kind : std::uint8_t { kSharedLoad, kSharedStore, kGlobalLoad, kGlobalStore, kKinds };

struct Access {
  std::uint8_t kind;
  std::uint8_t lane;
  std::uint16_t bytes;
  std::uint32_t warp;
  std::uint32_t occurrence;  // how many times this thread made an access at `site` before
  const void* site;
  std::uintptr_t address;  // global: the address; shared: the byte offset in the block's shared memory
};

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  ThreadContext thread;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  std::uint64_t warp_value = 0;
  double warp_operands[2] = {0.0, 0.0};  // a lane's A and B elements at an mma.sync
  unsigned warp_mask = 0;
  const char* warp_operation = nullptr;  // what a fiber at a warp barrier waits in: "shuffle" or "mma.sync"
  std::unordered_map<const void*, std::uint32_t> occurrences;  // per access site, in profiled blocks only
};

struct SharedSlot {
  const void* site;
  void* memory;
  void (*destroy)(void*);
};

// Who last wrote and read one address of global memory during the launch (-1: nobody).
struct Shadow {
  std::int64_t writer_block = -1, reader_block = -1;
  int writer_thread = -1, reader_thread = -1;
  std::uint64_t write_epoch = 0, read_epoch = 0;
};

// A request count and what it cost: wavefronts (shared) or sectors (global), and their ideal.
struct Cost {
  std::uint64_t requests = 0, actual = 0, ideal = 0;
};

struct Launch {
  const char* kernel;
  LaunchExtent grid, block;
  Regions regions;
  std::unordered_map<std::uintptr_t, Shadow> shadow;
  bool random_order = false;
  std::mt19937_64 random;
  bool profile = false;
  std::int64_t profile_stride = 1;  // every profile_stride-th block is profiled
  std::int64_t profiled_blocks = 0;
  std::size_t shared_bytes = 0;  // static shared memory of a block (the largest any block declared)
  Cost costs[kKinds];

  std::string describe() const { return describe_launch(kernel, grid, block); }
};

}  // namespace

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  std::uint64_t epoch = 0;
  std::int64_t rank = 0;  // linear index of the block in its grid
  int running = -1;
  std::exception_ptr error;
  std::vector<SharedSlot> shared;
  std::size_t shared_bytes = 0;
  bool profiled = false;
  std::vector<Access> accesses;  // of a profiled block
  std::vector<int> order;        // the order of a sweep over the fibers
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
thread_local Launch* g_launch = nullptr;
thread_local std::uint64_t g_launch_count = 0;  // seeds each launch's random order differently
// Fiber stacks, kept across launches on this OS thread.
thread_local std::vector<std::unique_ptr<char[]>> g_stacks;
// Profile lines not yet taken, from launches on any OS thread.
std::mutex g_profile_mutex;
std::vector<std::string> g_profile_lines;

Fiber& running_fiber() {
  if (g_block == nullptr || g_block->running < 0) {
    throw EmulationError("a CUDA built-in (threadIdx, __syncthreads, a shuffle, shared or global memory) was used "
                         "outside a kernel launched through the emulator");
  }
  return g_block->fibers[static_cast<std::size_t>(g_block->running)];
}

// Gives control back to the scheduler until it makes this fiber ready again.
void wait(State state) {
  Fiber& fiber = running_fiber();
  fiber.state = state;
  swapcontext(&fiber.context, &g_block->scheduler);
}

// In the random order, a thread gives way to the others at one memory access in four.
void maybe_switch() {
  if (g_launch->random_order && g_launch->random() % 4 == 0) wait(State::kReady);
}

void record(Kind kind, const void* site, std::uintptr_t address, std::size_t bytes) {
  Fiber& fiber = running_fiber();
  if (!g_block->profiled) return;
  const int linear = fiber.thread.linear;
  g_block->accesses.push_back({kind, static_cast<std::uint8_t>(linear % kWarpSize), static_cast<std::uint16_t>(bytes),
                               static_cast<std::uint32_t>(linear / kWarpSize), fiber.occurrences[site]++, site,
                               address});
}

dim3 unflatten(std::int64_t linear, const LaunchExtent& extent) {
  return dim3(static_cast<unsigned>(linear % extent.x), static_cast<unsigned>(linear / extent.x % extent.y),
              static_cast<unsigned>(linear / (extent.x * extent.y)));
}

std::string thread_name(std::int64_t block, int thread) {
  return "block " + describe_extent(unflatten(block, g_launch->grid)) + " thread " +
         describe_extent(unflatten(thread, g_launch->block));
}

// `address` as the launch argument it lies in and its element index there.
std::string element_name(std::uintptr_t address) {
  const Region* best = nullptr;
  for (const Region& region : g_launch->regions) {
    if (region.begin <= address && (best == nullptr || region.begin > best->begin)) best = &region;
  }
  if (best == nullptr) return "global address " + std::to_string(address);
  const std::uintptr_t offset = address - best->begin;
  return best->name + "[" + std::to_string(offset / best->element_bytes) + "]" +
         (offset % best->element_bytes != 0 ? " (+" + std::to_string(offset % best->element_bytes) + " bytes)" : "");
}

[[noreturn]] void global_race(const char* kind, std::uintptr_t address, std::int64_t other_block, int other_thread) {
  const Fiber& fiber = running_fiber();
  const bool same_block = other_block == g_block->rank;
  fail(std::string("global-memory race (") + kind + ") in " + g_launch->kernel + ": " + element_name(address) +
       " is accessed by " + thread_name(other_block, other_thread) + " and " +
       thread_name(g_block->rank, fiber.thread.linear) +
       (same_block ? " with no __syncthreads() between" : ", different blocks, which nothing orders within a launch"));
}

// True if the access of (block, thread) at `epoch` and the current thread's conflict: another block, or
// another thread of this block since the last barrier.
bool conflicts(std::int64_t block, int thread, std::uint64_t epoch) {
  if (block < 0) return false;
  if (block != g_block->rank) return true;
  return thread != running_fiber().thread.linear && epoch == g_block->epoch;
}

// ---- scheduling ----

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
      return "a warp " + std::string(fiber.warp_operation);
    case State::kDone:
      return "exited";
    default:
      return "running";
  }
}

std::string hex(unsigned mask) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08x", mask);
  return text;
}

// Releases the lanes of each warp whose mask's lanes all wait at one warp operation (a shuffle or an
// mma.sync) with that mask; true if any was released. A mask naming a lane that does not exist or has exited
// is an error: on a GPU the operation would hang or read an undefined value.
bool release_warps(Block& block) {
  bool released = false;
  const std::size_t threads = block.fibers.size();
  for (std::size_t first = 0; first < threads; first += kWarpSize) {
    for (std::size_t i = first; i < std::min(threads, first + kWarpSize); ++i) {
      const Fiber& waiting = block.fibers[i];
      if (waiting.state != State::kAtWarpBarrier) continue;
      bool all = true;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if (!(waiting.warp_mask >> lane & 1u)) continue;
        const std::size_t other = first + static_cast<std::size_t>(lane);
        const auto operation = [&] {  // built only for a report
          return "a warp " + std::string(waiting.warp_operation) + " in " + g_launch->kernel + " by thread " +
                 std::to_string(waiting.thread.linear) + " with mask " + hex(waiting.warp_mask);
        };
        if (other >= threads) {
          fail(operation() + " names lane " + std::to_string(lane) + " of a warp with only " +
               std::to_string(threads - first) + " lanes (inactive lanes)");
        }
        const Fiber& partner = block.fibers[other];
        if (partner.state == State::kDone) {
          fail(operation() + " names lane " + std::to_string(lane) + " (thread " + std::to_string(other) +
               "), which has exited");
        }
        if (partner.state != State::kAtWarpBarrier) {
          all = false;
        } else if (partner.warp_mask != waiting.warp_mask || partner.warp_operation != waiting.warp_operation) {
          fail(operation() + " meets thread " + std::to_string(other) + " at a warp " + partner.warp_operation +
               " with mask " + hex(partner.warp_mask));
        }
      }
      if (!all) continue;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if (waiting.warp_mask >> lane & 1u) block.fibers[first + static_cast<std::size_t>(lane)].state = State::kReady;
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
  block.order.resize(block.fibers.size());
  for (std::size_t i = 0; i < block.order.size(); ++i) block.order[i] = static_cast<int>(i);
  while (true) {
    if (g_launch->random_order) std::shuffle(block.order.begin(), block.order.end(), g_launch->random);
    bool ran = false;
    for (const int i : block.order) {
      Fiber& fiber = block.fibers[static_cast<std::size_t>(i)];
      if (fiber.state != State::kReady) continue;
      ran = true;
      block.running = i;
      swapcontext(&block.scheduler, &fiber.context);
      block.running = -1;
      if (block.error) std::rethrow_exception(block.error);  // the other fibers are abandoned
    }
    if (ran) continue;  // until every thread waits or has exited (in the random order, some gave way)
    if (release_warps(block)) continue;
    if (!release_block(block)) return;  // every thread has exited
  }
}

// A fiber per thread of `block`, each ready to run the kernel from its start. (Out of line: the loops of the
// launch must not share a frame with getcontext.)
__attribute__((noinline)) void start_fibers(Block& block, std::size_t threads, const LaunchExtent& grid,
                                            const LaunchExtent& block_dim) {
  const auto as_dim3 = [](const LaunchExtent& e) {  // within CUDA's limits: checked at the launch
    return dim3(static_cast<unsigned>(e.x), static_cast<unsigned>(e.y), static_cast<unsigned>(e.z));
  };
  const dim3 block_idx = unflatten(block.rank, grid);
  block.fibers.resize(threads);
  for (std::size_t i = 0; i < threads; ++i) {
    Fiber& fiber = block.fibers[i];
    fiber.thread.thread_idx = unflatten(static_cast<std::int64_t>(i), block_dim);
    fiber.thread.block_idx = block_idx;
    fiber.thread.block_dim = as_dim3(block_dim);
    fiber.thread.grid_dim = as_dim3(grid);
    fiber.thread.linear = static_cast<int>(i);
    fiber.thread.block = &block;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = g_stacks[i].get();
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = &block.scheduler;
    makecontext(&fiber.context, fiber_main, 0);
  }
}

// ---- the profile ----

// Wavefronts of one shared-memory request: the most distinct 4-byte words any one of the 32 banks serves
// (lanes reading the same word share it); ideal: the distinct words / 32, rounded up.
void add_shared_request(const Access* first, const Access* last, Cost& cost) {
  std::vector<std::uintptr_t> words;
  for (const Access* a = first; a != last; ++a) {
    for (std::uintptr_t word = a->address / 4; word < (a->address + a->bytes + 3) / 4; ++word) words.push_back(word);
  }
  std::sort(words.begin(), words.end());
  words.erase(std::unique(words.begin(), words.end()), words.end());
  std::uint64_t per_bank[32] = {};
  for (const std::uintptr_t word : words) ++per_bank[word % 32];
  cost.requests += 1;
  cost.actual += *std::max_element(per_bank, per_bank + 32);
  cost.ideal += (words.size() + 31) / 32;
}

// Sectors of one global-memory request: the distinct 32-byte sectors its lanes touch; ideal: the distinct
// bytes / 32, rounded up (what the same bytes, packed and aligned, would take).
void add_global_request(const Access* first, const Access* last, Cost& cost) {
  std::vector<std::uintptr_t> sectors, bytes;
  for (const Access* a = first; a != last; ++a) {
    for (std::uintptr_t byte = a->address; byte < a->address + a->bytes; ++byte) bytes.push_back(byte);
  }
  std::sort(bytes.begin(), bytes.end());
  bytes.erase(std::unique(bytes.begin(), bytes.end()), bytes.end());
  for (const std::uintptr_t byte : bytes) {
    if (sectors.empty() || sectors.back() != byte / 32) sectors.push_back(byte / 32);
  }
  cost.requests += 1;
  cost.actual += sectors.size();
  cost.ideal += (bytes.size() + 31) / 32;
}

void fold_profile(Block& block, Launch& launch) {
  std::vector<Access>& accesses = block.accesses;
  std::sort(accesses.begin(), accesses.end(), [](const Access& a, const Access& b) {
    return std::tie(a.kind, a.warp, a.site, a.occurrence) < std::tie(b.kind, b.warp, b.site, b.occurrence);
  });
  for (std::size_t first = 0; first < accesses.size();) {
    std::size_t last = first + 1;
    const Access& f = accesses[first];
    while (last < accesses.size() && accesses[last].kind == f.kind && accesses[last].warp == f.warp &&
           accesses[last].site == f.site && accesses[last].occurrence == f.occurrence) {
      ++last;
    }
    if (f.kind == kSharedLoad || f.kind == kSharedStore) {
      add_shared_request(&accesses[first], &accesses[0] + last, launch.costs[f.kind]);
    } else {
      add_global_request(&accesses[first], &accesses[0] + last, launch.costs[f.kind]);
    }
    first = last;
  }
  ++launch.profiled_blocks;
}

std::string ratio(std::uint64_t numerator, std::uint64_t denominator) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f", denominator ? static_cast<double>(numerator) / denominator : 0.0);
  return text;
}

void print_profile(const Launch& launch, std::int64_t blocks) {
  const auto shared = [](const char* what, const Cost& c) {
    return std::string(what) + " requests=" + std::to_string(c.requests) + " wavefronts=" + std::to_string(c.actual) +
           " ideal=" + std::to_string(c.ideal) + " bank_conflicts=" + std::to_string(c.actual - c.ideal);
  };
  const auto global = [](const char* what, const Cost& c) {
    return std::string(what) + " requests=" + std::to_string(c.requests) + " sectors=" + std::to_string(c.actual) +
           " sectors_per_request=" + ratio(c.actual, c.requests) + " ideal=" + ratio(c.ideal, c.requests);
  };
  const std::string line = "fastkd emulator profile: " + std::string(launch.kernel) + " grid=" +
                           describe_extent(launch.grid) + " block=" + describe_extent(launch.block) +
                           " shared_bytes=" + std::to_string(launch.shared_bytes) + " profiled_blocks=" +
                           std::to_string(launch.profiled_blocks) + "/" + std::to_string(blocks) + " | " +
                           shared("shared loads:", launch.costs[kSharedLoad]) + " | " +
                           shared("shared stores:", launch.costs[kSharedStore]) + " | " +
                           global("global loads:", launch.costs[kGlobalLoad]) + " | " +
                           global("global stores:", launch.costs[kGlobalStore]);
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  const std::lock_guard<std::mutex> lock(g_profile_mutex);
  g_profile_lines.push_back(line);
}

bool environment_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::string(value) == "1";
}

}  // namespace

// ---- the hooks kernels call ----

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

std::uint64_t warp_exchange(std::uint64_t value, int source_lane, unsigned mask) {
  Fiber& fiber = running_fiber();
  const int lane = fiber.thread.linear % kWarpSize;
  if (!(mask >> lane & 1u)) {
    fail("a shuffle in " + std::string(g_launch->kernel) + " by thread " + std::to_string(fiber.thread.linear) +
         " with mask " + hex(mask) + ", which does not name its own lane " + std::to_string(lane));
  }
  fiber.warp_value = value;
  fiber.warp_mask = mask;
  fiber.warp_operation = "shuffle";
  wait(State::kAtWarpBarrier);  // every lane of the mask has published its value
  std::uint64_t result = value;
  if (source_lane >= 0 && source_lane < kWarpSize) {
    if (!(mask >> source_lane & 1u)) {
      fail("a shuffle in " + std::string(g_launch->kernel) + " by thread " + std::to_string(fiber.thread.linear) +
           " reads lane " + std::to_string(source_lane) + ", which its mask " + hex(mask) + " does not name");
    }
    const int source = fiber.thread.linear / kWarpSize * kWarpSize + source_lane;
    result = g_block->fibers[static_cast<std::size_t>(source)].warp_value;
  }
  wait(State::kAtWarpBarrier);  // every lane has read before any publishes again
  return result;
}

void warp_mma_m8n8k4_f64(double a, double b, double (&d)[2]) {
  Fiber& fiber = running_fiber();
  fiber.warp_operands[0] = a;
  fiber.warp_operands[1] = b;
  fiber.warp_mask = 0xffffffffu;
  fiber.warp_operation = "mma.sync";
  wait(State::kAtWarpBarrier);  // all 32 lanes have published their A and B elements
  const int lane = fiber.thread.linear % kWarpSize;
  const std::size_t warp = static_cast<std::size_t>(fiber.thread.linear / kWarpSize * kWarpSize);
  const auto element = [&](int from_lane, int which) { return g_block->fibers[warp + from_lane].warp_operands[which]; };
  // The PTX fragments of m8n8k4 (row.col): lane l holds A[l / 4][l % 4], B[l % 4][l / 4], and D[l / 4][2 (l % 4) + i].
  const int row = lane / 4;
  for (int i = 0; i < 2; ++i) {
    const int col = 2 * (lane % 4) + i;
    for (int k = 0; k < 4; ++k) d[i] = std::fma(element(row * 4 + k, 0), element(col * 4 + k, 1), d[i]);
  }
  wait(State::kAtWarpBarrier);  // every lane has read before any publishes again
}

void global_load(const void* address, std::size_t bytes, bool writable_pointer) {
  Fiber& fiber = running_fiber();
  maybe_switch();
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(address);
  record(kGlobalLoad, __builtin_return_address(0), at, bytes);
  Launch& launch = *g_launch;
  const auto found = launch.shadow.find(at);
  if (found != launch.shadow.end()) {
    Shadow& shadow = found->second;
    if (conflicts(shadow.writer_block, shadow.writer_thread, shadow.write_epoch)) {
      global_race("read after write", at, shadow.writer_block, shadow.writer_thread);
    }
    if (writable_pointer && !conflicts(shadow.reader_block, shadow.reader_thread, shadow.read_epoch)) {
      shadow.reader_block = g_block->rank;
      shadow.reader_thread = fiber.thread.linear;
      shadow.read_epoch = g_block->epoch;
    }
  } else if (writable_pointer) {  // only what a kernel may also write is worth remembering as read
    Shadow& shadow = launch.shadow[at];
    shadow.reader_block = g_block->rank;
    shadow.reader_thread = fiber.thread.linear;
    shadow.read_epoch = g_block->epoch;
  }
}

void global_store(const void* address, std::size_t bytes) {
  Fiber& fiber = running_fiber();
  maybe_switch();
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(address);
  record(kGlobalStore, __builtin_return_address(0), at, bytes);
  Shadow& shadow = g_launch->shadow[at];
  if (conflicts(shadow.writer_block, shadow.writer_thread, shadow.write_epoch)) {
    global_race("write after write", at, shadow.writer_block, shadow.writer_thread);
  }
  if (conflicts(shadow.reader_block, shadow.reader_thread, shadow.read_epoch)) {
    global_race("write after read", at, shadow.reader_block, shadow.reader_thread);
  }
  shadow.writer_block = g_block->rank;
  shadow.writer_thread = fiber.thread.linear;
  shadow.write_epoch = g_block->epoch;
}

void shared_access(const void* site, std::size_t offset, std::size_t bytes, bool store) {
  running_fiber();
  maybe_switch();
  record(store ? kSharedStore : kSharedLoad, site, offset, bytes);
}

void* block_shared(const void* site, std::size_t bytes, std::size_t data_bytes,
                   void* (*create)(void*, const char*, std::size_t), void (*destroy)(void*), const char* name) {
  running_fiber();
  for (SharedSlot& slot : g_block->shared) {
    if (slot.site == site) return slot.memory;
  }
  const std::size_t offset = (g_block->shared_bytes + kSharedAlignment - 1) / kSharedAlignment * kSharedAlignment;
  g_block->shared_bytes = offset + data_bytes;
  if (g_block->shared_bytes > static_cast<std::size_t>(kMaxStaticSharedBytes)) {
    fail("launching " + g_launch->describe() + ": static shared memory = " + std::to_string(g_block->shared_bytes) +
         " bytes with " + name + ", the limit is 49152 (48 KiB)");
  }
  g_launch->shared_bytes = std::max(g_launch->shared_bytes, g_block->shared_bytes);
  void* memory = ::operator new(bytes);
  create(memory, name, offset);
  g_block->shared.push_back({site, memory, destroy});
  return memory;
}

std::vector<std::string> take_profile() {
  const std::lock_guard<std::mutex> lock(g_profile_mutex);
  return std::move(g_profile_lines);
}

std::vector<std::string> split_arguments(const char* argument_names) {
  std::vector<std::string> names(1);
  int depth = 0;
  for (const char* c = argument_names; *c != '\0'; ++c) {
    if (*c == '(' || *c == '[' || *c == '{') ++depth;
    if (*c == ')' || *c == ']' || *c == '}') --depth;
    if (*c == ',' && depth == 0) {
      names.emplace_back();
    } else if (*c != ' ' || !names.back().empty()) {
      names.back() += *c;
    }
  }
  return names;
}

void run_launch(const char* kernel, const LaunchExtent& grid, const LaunchExtent& block_dim, Regions regions,
                const std::function<void()>& body) {
  if (g_block != nullptr) fail("a kernel launched another kernel");
  try {
    check_launch_limits(kernel, grid, block_dim);
  } catch (const std::runtime_error& error) {
    fail(error.what());
  }
  Launch launch;
  launch.kernel = kernel;
  launch.grid = grid;
  launch.block = block_dim;
  launch.regions = std::move(regions);
  const char* order = std::getenv("FASTKD_EMULATOR_ORDER");
  const std::string order_name = order != nullptr ? order : "";
  if (order_name != "" && order_name != "launch" && order_name != "random") {
    fail("FASTKD_EMULATOR_ORDER is '" + order_name + "': 'launch' (the default) or 'random'");
  }
  launch.random_order = order_name == "random";
  const char* seed = std::getenv("FASTKD_EMULATOR_SEED");
  launch.random.seed((seed != nullptr ? std::strtoull(seed, nullptr, 10) : 0) * 1000003u + g_launch_count++);
  const std::int64_t blocks = grid.volume();
  launch.profile = environment_flag("FASTKD_EMULATOR_PROFILE");
  launch.profile_stride = (blocks + kProfiledBlocks - 1) / kProfiledBlocks;

  std::vector<std::int64_t> ranks;  // the order of the blocks
  if (launch.random_order) {
    ranks.resize(static_cast<std::size_t>(blocks));
    for (std::int64_t r = 0; r < blocks; ++r) ranks[static_cast<std::size_t>(r)] = r;
    std::shuffle(ranks.begin(), ranks.end(), launch.random);
  }
  const std::size_t threads = static_cast<std::size_t>(block_dim.volume());
  while (g_stacks.size() < threads) g_stacks.emplace_back(new char[kStackBytes]);
  g_launch = &launch;
  try {
    for (std::int64_t step = 0; step < blocks; ++step) {
      Block block;
      block.rank = launch.random_order ? ranks[static_cast<std::size_t>(step)] : step;
      block.body = &body;
      block.profiled = launch.profile && block.rank % launch.profile_stride == 0;
      start_fibers(block, threads, grid, block_dim);
      g_block = &block;
      run_block(block);
      g_block = nullptr;
      if (block.profiled) fold_profile(block, launch);
    }
  } catch (...) {
    g_block = nullptr;
    g_launch = nullptr;
    throw;
  }
  g_launch = nullptr;
  if (launch.profile) print_profile(launch, blocks);
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
