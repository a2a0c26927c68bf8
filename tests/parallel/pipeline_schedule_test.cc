// The pipeline schedules: every (micro-batch, chunk) runs forward once and
// backward once, backward after forward, in-flight micro-batches bounded as
// 1F1B promises, and the table of a small 1F1B case.
#include "parallel/pipeline_schedule.h"

#include <gtest/gtest.h>

#include <map>
#include <set>

namespace loom {
namespace {

TEST(PipelineSchedule, OneFOneBTable) {
  // pp 3, 4 micro-batches, rank 0: 2 warm-up forwards, 1F1B, cool-down.
  auto s = PipelineSchedule(3, 1, 0, 4);
  ASSERT_TRUE(s.ok());
  const std::vector<PipelineTask> want = {{true, 0, 0},  {true, 1, 0},  {true, 2, 0},  {false, 0, 0},
                                          {true, 3, 0},  {false, 1, 0}, {false, 2, 0}, {false, 3, 0}};
  EXPECT_EQ(*s, want);
  auto last = PipelineSchedule(3, 1, 2, 4);  // the last stage alternates from the start
  ASSERT_TRUE(last.ok());
  EXPECT_EQ((*last)[0], (PipelineTask{true, 0, 0}));
  EXPECT_EQ((*last)[1], (PipelineTask{false, 0, 0}));
}

TEST(PipelineSchedule, EveryTaskOnceAndInFlightBounded) {
  for (int pp : {2, 3, 4})
    for (int vpp : {1, 2, 3})
      for (int m : {pp, 2 * pp, 4 * pp})
        for (int rank = 0; rank < pp; ++rank) {
          SCOPED_TRACE(testing::Message() << "pp " << pp << " vpp " << vpp << " m " << m << " rank " << rank);
          auto s = PipelineSchedule(pp, vpp, rank, m);
          ASSERT_TRUE(s.ok());
          std::set<std::pair<int, int>> done_f, done_b;
          int in_flight = 0, peak = 0;
          for (const PipelineTask& t : *s) {
            const auto key = std::make_pair(t.micro, t.chunk);
            if (t.forward) {
              EXPECT_TRUE(done_f.insert(key).second);
              peak = std::max(peak, ++in_flight);
            } else {
              EXPECT_TRUE(done_f.count(key)) << "backward before forward";
              EXPECT_TRUE(done_b.insert(key).second);
              --in_flight;
            }
          }
          EXPECT_EQ(done_f.size(), size_t(m * vpp));
          EXPECT_EQ(done_b.size(), size_t(m * vpp));
          if (vpp == 1) EXPECT_LE(peak, pp - rank);
          else EXPECT_LE(peak, (pp - rank - 1) * 2 + (vpp - 1) * pp + 1);
        }
}

TEST(PipelineSchedule, InterleavedNeedsWholeRounds) {
  auto s = PipelineSchedule(4, 2, 0, 6);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("multiple of parallel.pp = 4"), std::string::npos);
}

}  // namespace
}  // namespace loom
