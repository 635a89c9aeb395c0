// CUDA's launch limits, checked before every launch (FASTKD_LAUNCH in fastkd_cuda.cuh, under nvcc and under the
// emulator alike), so that a configuration the driver would refuse is reported with the limit it breaks. Plain
// C++: the CUDA runtime's dim3 converts to a LaunchExtent, and nothing here needs a CUDA header.
//
// The limits hold for every architecture fastkd builds for (compute capability 5.0 and later; the CUDA C++
// Programming Guide, "Features and Technical Specifications"): block x and y at most 1024, z at most 64, at
// most 1024 threads per block; grid x at most 2^31 - 1, y and z at most 65535; at most 48 KiB of static
// shared memory per block (more needs dynamic shared memory and an opt-in, which no fastkd kernel uses).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastkd {

constexpr std::int64_t kMaxBlockXY = 1024, kMaxBlockZ = 64, kMaxThreadsPerBlock = 1024;
constexpr std::int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;
constexpr std::int64_t kMaxStaticSharedBytes = 48 * 1024;

// A grid or block shape in 64 bits: a launcher's block count that would not fit CUDA's 32-bit dim3 is caught
// here instead of being truncated into a smaller grid that skips work.
struct LaunchExtent {
  std::int64_t x, y, z;
  constexpr LaunchExtent(std::int64_t x_ = 1, std::int64_t y_ = 1, std::int64_t z_ = 1) : x(x_), y(y_), z(z_) {}
  template <typename Dim3, typename = decltype(Dim3::x), typename = decltype(Dim3::z)>
  constexpr LaunchExtent(const Dim3& d) : x(d.x), y(d.y), z(d.z) {}  // NOLINT: a dim3 converts implicitly
  std::int64_t volume() const { return x * y * z; }
};

inline std::string describe_extent(const LaunchExtent& e) {
  std::string text("(");  // appended piece by piece: GCC 12 warns (-Wrestrict) on "(" + std::string
  text += std::to_string(e.x) + ", " + std::to_string(e.y) + ", " + std::to_string(e.z) + ")";
  return text;
}

inline std::string describe_launch(const char* kernel, const LaunchExtent& grid, const LaunchExtent& block) {
  return std::string(kernel) + " with grid " + describe_extent(grid) + " and block " + describe_extent(block);
}

// Throws std::runtime_error naming the kernel, its configuration and the first limit it breaks.
inline void check_launch_limits(const char* kernel, const LaunchExtent& grid, const LaunchExtent& block) {
  const auto refuse = [&](const std::string& what, std::int64_t value, const std::string& limit) {
    throw std::runtime_error("fastkd: launching " + describe_launch(kernel, grid, block) + ": " + what + " = " +
                             std::to_string(value) + ", " + limit);
  };
  const auto smallest = [](const LaunchExtent& e) {
    const std::int64_t xy = e.x < e.y ? e.x : e.y;
    return xy < e.z ? xy : e.z;
  };
  if (smallest(block) < 1) refuse("the smallest block dimension", smallest(block), "at least 1 is needed");
  if (block.x > kMaxBlockXY) refuse("block x", block.x, "the limit is 1024");
  if (block.y > kMaxBlockXY) refuse("block y", block.y, "the limit is 1024");
  if (block.z > kMaxBlockZ) refuse("block z", block.z, "the limit is 64");
  if (block.volume() > kMaxThreadsPerBlock) refuse("threads per block", block.volume(), "the limit is 1024");
  if (smallest(grid) < 1) refuse("the smallest grid dimension", smallest(grid), "at least 1 is needed");
  if (grid.x > kMaxGridX) refuse("grid x", grid.x, "the limit is 2^31 - 1");
  if (grid.y > kMaxGridYZ) refuse("grid y", grid.y, "the limit is 65535");
  if (grid.z > kMaxGridYZ) refuse("grid z", grid.z, "the limit is 65535");
}

}  // namespace fastkd
