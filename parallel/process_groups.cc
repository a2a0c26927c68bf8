#include "parallel/process_groups.h"

namespace loom {

absl::StatusOr<std::unique_ptr<ProcessGroups>> ProcessGroups::Make(Communicator& world, const Layout& layout) {
  if (world.size() != layout.world)
    return absl::InvalidArgumentError(absl::StrCat("[parallel] layout for ", layout.world, " ranks on a world of ",
                                                   world.size()));
  auto g = std::make_unique<ProcessGroups>();
  g->layout = layout;
  g->coords = CoordsOf(layout, world.rank());
  g->world = &world;
  // Each group is named by its first member; the key is the position in it.
  auto split = [&](Axis axis) -> absl::StatusOr<std::unique_ptr<Communicator>> {
    const std::vector<int> ranks = GroupRanks(layout, world.rank(), axis);
    int position = 0;
    while (ranks[position] != world.rank()) ++position;
    return world.Split(ranks[0], position);
  };
  LOOM_ASSIGN_OR_RETURN(g->tp, split(Axis::kTp));
  LOOM_ASSIGN_OR_RETURN(g->cp, split(Axis::kCp));
  LOOM_ASSIGN_OR_RETURN(g->dp, split(Axis::kDp));
  LOOM_ASSIGN_OR_RETURN(g->pp, split(Axis::kPp));
  LOOM_ASSIGN_OR_RETURN(g->ep, split(Axis::kEp));
  LOOM_ASSIGN_OR_RETURN(g->expert_dp, split(Axis::kExpertDp));
  LOOM_ASSIGN_OR_RETURN(g->dp_cp, split(Axis::kDpCp));
  LOOM_ASSIGN_OR_RETURN(g->model, split(Axis::kModel));
  return g;
}

}  // namespace loom
