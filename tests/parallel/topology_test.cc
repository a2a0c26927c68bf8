// The rank topology as a table: coordinates and group members of every rank
// of a tp2 cp2 dp2 pp2 (ep2) world, and the layout refusals naming numbers.
#include "parallel/topology.h"

#include <gtest/gtest.h>

#include "runtime/config.h"

namespace loom {
namespace {

TEST(Topology, RankOrderIsTpCpDpPp) {
  const Layout l{.world = 16, .tp = 2, .cp = 2, .dp = 2, .pp = 2, .ep = 2};
  // rank: tp cp dp pp
  const int table[16][4] = {{0, 0, 0, 0}, {1, 0, 0, 0}, {0, 1, 0, 0}, {1, 1, 0, 0}, {0, 0, 1, 0}, {1, 0, 1, 0},
                            {0, 1, 1, 0}, {1, 1, 1, 0}, {0, 0, 0, 1}, {1, 0, 0, 1}, {0, 1, 0, 1}, {1, 1, 0, 1},
                            {0, 0, 1, 1}, {1, 0, 1, 1}, {0, 1, 1, 1}, {1, 1, 1, 1}};
  for (int r = 0; r < 16; ++r) {
    const Coords c = CoordsOf(l, r);
    EXPECT_EQ(c, (Coords{table[r][0], table[r][1], table[r][2], table[r][3]})) << "rank " << r;
    EXPECT_EQ(RankOf(l, c), r);
  }
}

TEST(Topology, GroupsOfRankSeven) {
  const Layout l{.world = 16, .tp = 2, .cp = 2, .dp = 2, .pp = 2, .ep = 2};
  // Rank 7 = tp1 cp1 dp1 pp0.
  EXPECT_EQ(GroupRanks(l, 7, Axis::kTp), (std::vector<int>{6, 7}));
  EXPECT_EQ(GroupRanks(l, 7, Axis::kCp), (std::vector<int>{5, 7}));
  EXPECT_EQ(GroupRanks(l, 7, Axis::kDp), (std::vector<int>{3, 7}));
  EXPECT_EQ(GroupRanks(l, 7, Axis::kPp), (std::vector<int>{7, 15}));
  EXPECT_EQ(GroupRanks(l, 7, Axis::kEp), (std::vector<int>{3, 7}));
  EXPECT_EQ(GroupRanks(l, 7, Axis::kExpertDp), (std::vector<int>{5, 7}));
  EXPECT_EQ(GroupRanks(l, 7, Axis::kDpCp), (std::vector<int>{1, 3, 5, 7}));
  EXPECT_EQ(GroupRanks(l, 7, Axis::kModel), (std::vector<int>{6, 7, 14, 15}));
}

TEST(Topology, ExpertGroupsSplitDp) {
  const Layout l{.world = 8, .tp = 1, .cp = 1, .dp = 8, .pp = 1, .ep = 2};
  EXPECT_EQ(GroupRanks(l, 5, Axis::kEp), (std::vector<int>{4, 5}));
  EXPECT_EQ(GroupRanks(l, 5, Axis::kExpertDp), (std::vector<int>{1, 3, 5, 7}));
}

config::Config Base() {
  config::Config c;
  c.mutable_model()->set_heads(4);
  c.mutable_model()->set_kv_heads(2);
  c.mutable_model()->set_layers(4);
  c.mutable_train()->set_global_batch(8);
  c.mutable_train()->set_micro_batch(2);
  c.mutable_train()->set_seq_len(12);
  return c;
}

std::string Refusal(int world, void (*edit)(config::Config&)) {
  config::Config c = Base();
  edit(c);
  auto l = MakeLayout(world, c);
  return l.ok() ? "accepted" : std::string(l.status().message());
}

TEST(Topology, LayoutsThatDoNotFitAreRefusedWithTheNumbers) {
  auto ok = MakeLayout(8, [] {
    config::Config c = Base();
    c.mutable_parallel()->set_tp(2);
    c.mutable_parallel()->set_pp(2);
    return c;
  }());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->dp, 2);
  EXPECT_NE(Refusal(6, [](config::Config& c) { c.mutable_parallel()->set_tp(4); }).find("world of 6 ranks is not divisible by tp·cp·pp = 4"), std::string::npos);
  EXPECT_NE(Refusal(4, [](config::Config& c) { c.mutable_parallel()->set_tp(4); }).find("does not divide model.heads = 4 and model.kv_heads = 2"), std::string::npos);
  EXPECT_NE(Refusal(3, [](config::Config& c) { c.mutable_parallel()->set_pp(3); }).find("pp·vpp = 3·1 = 3 does not divide model.layers = 4"), std::string::npos);
  EXPECT_NE(Refusal(4, [](config::Config& c) { c.mutable_parallel()->set_ep(3); }).find("ep = 3 does not divide the data-parallel size dp = 4"), std::string::npos);
  EXPECT_NE(Refusal(8, [](config::Config& c) { c.mutable_train()->set_global_batch(4); }).find("global_batch = 4 is not a multiple of dp·micro_batch = 8·2 = 16"), std::string::npos);
  EXPECT_NE(Refusal(4, [](config::Config& c) { c.mutable_parallel()->set_cp(4); }).find("seq_len = 12 is not divisible by 2·cp = 8"), std::string::npos);
  EXPECT_NE(Refusal(2, [](config::Config& c) { c.mutable_parallel()->set_vpp(2); }).find("vpp = 2 needs parallel.pp >= 2"), std::string::npos);
}

}  // namespace
}  // namespace loom
