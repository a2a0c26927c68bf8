// Helpers of the multi-rank tests: the world communicator (MPI, 60 s
// timeout) and split groups for running several small cases side by side.
#pragma once

#include <gtest/gtest.h>

#include "parallel/mpi_communicator.h"

namespace loom::testing {

inline Communicator& World() {
  static std::unique_ptr<Communicator> world = [] {
    auto w = MpiWorld(/*timeout_s=*/60);
    LOOM_CHECK(w.ok(), w.status().message());
    return std::move(*w);
  }();
  return *world;
}

// The first n ranks of the world as one group (nullptr on the others, who
// sit the case out); every rank must call it (the split is collective).
inline std::unique_ptr<Communicator> FirstRanks(int n) {
  Communicator& world = World();
  auto sub = world.Split(world.rank() < n ? 0 : 1, world.rank());
  LOOM_CHECK(sub.ok(), sub.status().message());
  if (world.rank() >= n) return nullptr;
  return std::move(*sub);
}

}  // namespace loom::testing
