// Shared by the fuzz targets: the readers under test take paths, so each
// input is written to files in a private temporary folder (in /dev/shm when
// there is one: no disk I/O per run), removed when the fuzzer exits.
//
// Inputs that hold two files are framed as [u32 little-endian length of the
// first][first file][second file]; a length past the end takes all the rest.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <utility>

namespace loom::fuzz {

// The folder, made on first use. Never destroyed: the atexit hook that
// removes the folder must still be able to read its name.
inline const std::string& ScratchDir() {
  static const std::string* const dir = [] {
    const char* base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : std::getenv("TMPDIR");
    std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/loom_fuzz.XXXXXX";
    char* made = ::mkdtemp(pattern.data());
    if (made == nullptr) std::abort();
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(ScratchDir(), ec);
    });
    return new std::string(pattern);
  }();
  return *dir;
}

inline void WriteFile(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::pair<std::string_view, std::string_view> SplitTwo(const uint8_t* data, size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  if (size < 4) return {all, {}};
  uint32_t first = 0;
  std::memcpy(&first, data, 4);
  const std::string_view rest = all.substr(4);
  const size_t n = std::min<size_t>(first, rest.size());
  return {rest.substr(0, n), rest.substr(n)};
}

inline std::string JoinTwo(std::string_view first, std::string_view second) {
  const uint32_t n = static_cast<uint32_t>(first.size());
  std::string out(reinterpret_cast<const char*>(&n), 4);
  out.append(first);
  out.append(second);
  return out;
}

}  // namespace loom::fuzz
