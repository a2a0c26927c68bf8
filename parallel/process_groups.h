// The communicators of one rank's groups along every axis of its layout
// (parallel/topology.h), split from the world once at start-up.
#pragma once

#include <memory>

#include "parallel/communicator.h"
#include "parallel/topology.h"

namespace loom {

struct ProcessGroups {
  Layout layout;
  Coords coords;
  Communicator* world = nullptr;  // not owned
  std::unique_ptr<Communicator> tp, cp, dp, pp, ep, expert_dp, dp_cp, model;

  // Collective over `world`, whose size must equal layout.world.
  static absl::StatusOr<std::unique_ptr<ProcessGroups>> Make(Communicator& world, const Layout& layout);
};

}  // namespace loom
