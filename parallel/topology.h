// Rank topology (DESIGN.md, Topology): world = tp · cp · dp · pp, rank order
// "tp-cp-dp-pp" (tp fastest-varying, so a TP group sits inside one node):
//   rank = tp + TP·(cp + CP·(dp + DP·pp)).
// Expert parallelism splits each DP group into dp/ep blocks of ep
// consecutive dp indices: ep index = dp mod ep, expert-dp index = dp / ep;
// expert gradients are reduced over the expert-dp group, which also spans
// the cp ranks (they hold the same experts and other tokens).
// Everything here is a pure function of the layout (table-tested).
#pragma once

#include <string>
#include <vector>

#include "configs/loom.pb.h"
#include "runtime/status.h"

namespace loom {

struct Layout {
  int world = 1, tp = 1, cp = 1, dp = 1, pp = 1, ep = 1, vpp = 1;
  std::string ToString() const;  // "tp2 cp1 dp2 pp1 (ep1 vpp1)"
};

struct Coords {
  int tp = 0, cp = 0, dp = 0, pp = 0;
  bool operator==(const Coords&) const = default;
};

// kDpCp: the ranks holding the same parameters (gradients are summed over
// them). kModel: tp × pp, the ranks holding different parameters of one replica.
enum class Axis { kTp, kCp, kDp, kPp, kEp, kExpertDp, kDpCp, kModel };

int RankOf(const Layout& layout, const Coords& coords);
Coords CoordsOf(const Layout& layout, int rank);
// World ranks of `rank`'s group along `axis`, in group order (the position
// of a rank in the list is its rank in the group).
std::vector<int> GroupRanks(const Layout& layout, int rank, Axis axis);

// The layout of `world` ranks for a config, or an error that names the
// numbers: tp·cp·pp must divide the world, tp the heads and KV heads, pp·vpp
// the layers, ep the derived dp, dp·micro_batch the global batch, 2·cp the
// sequence length.
absl::StatusOr<Layout> MakeLayout(int world, const config::Config& config);

}  // namespace loom
