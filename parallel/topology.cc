#include "parallel/topology.h"

#include "absl/strings/str_cat.h"
#include "parallel/cp_attention.h"

namespace loom {

std::string Layout::ToString() const {
  return absl::StrCat("tp", tp, " cp", cp, " dp", dp, " pp", pp, " (ep", ep, " vpp", vpp, ")");
}

int RankOf(const Layout& l, const Coords& c) { return c.tp + l.tp * (c.cp + l.cp * (c.dp + l.dp * c.pp)); }

Coords CoordsOf(const Layout& l, int rank) {
  Coords c;
  c.tp = rank % l.tp;
  rank /= l.tp;
  c.cp = rank % l.cp;
  rank /= l.cp;
  c.dp = rank % l.dp;
  c.pp = rank / l.dp;
  return c;
}

std::vector<int> GroupRanks(const Layout& l, int rank, Axis axis) {
  const Coords me = CoordsOf(l, rank);
  std::vector<int> ranks;
  auto add = [&](Coords c) { ranks.push_back(RankOf(l, c)); };
  Coords c = me;
  switch (axis) {
    case Axis::kTp:
      for (c.tp = 0; c.tp < l.tp; ++c.tp) add(c);
      break;
    case Axis::kCp:
      for (c.cp = 0; c.cp < l.cp; ++c.cp) add(c);
      break;
    case Axis::kDp:
      for (c.dp = 0; c.dp < l.dp; ++c.dp) add(c);
      break;
    case Axis::kPp:
      for (c.pp = 0; c.pp < l.pp; ++c.pp) add(c);
      break;
    case Axis::kEp:  // same dp / ep block
      for (int e = 0; e < l.ep; ++e) {
        c.dp = me.dp / l.ep * l.ep + e;
        add(c);
      }
      break;
    case Axis::kExpertDp:  // same dp mod ep, every cp index (cp fastest)
      for (int b = 0; b < l.dp / l.ep; ++b) {
        c.dp = b * l.ep + me.dp % l.ep;
        for (c.cp = 0; c.cp < l.cp; ++c.cp) add(c);
      }
      break;
    case Axis::kDpCp:  // cp fastest, as in the rank order
      for (c.dp = 0; c.dp < l.dp; ++c.dp)
        for (c.cp = 0; c.cp < l.cp; ++c.cp) add(c);
      break;
    case Axis::kModel:
      for (c.pp = 0; c.pp < l.pp; ++c.pp)
        for (c.tp = 0; c.tp < l.tp; ++c.tp) add(c);
      break;
  }
  return ranks;
}

absl::StatusOr<Layout> MakeLayout(int world, const config::Config& config) {
  const auto& p = config.parallel();
  const auto& m = config.model();
  const auto& t = config.train();
  auto bad = [](const std::string& message) { return absl::InvalidArgumentError("[parallel] " + message); };
  Layout l;
  l.world = world;
  l.tp = p.tp();
  l.cp = p.cp();
  l.pp = p.pp();
  l.ep = p.ep();
  l.vpp = p.vpp();
  if (l.tp < 1 || l.cp < 1 || l.pp < 1 || l.ep < 1 || l.vpp < 1)
    return bad(absl::StrCat("parallel.tp, cp, pp, ep and vpp must be >= 1 (got ", l.ToString(), ")"));
  const int model_ranks = l.tp * l.cp * l.pp;
  if (world % model_ranks != 0)
    return bad(absl::StrCat("the world of ", world, " ranks is not divisible by tp·cp·pp = ", model_ranks, " (tp ",
                            l.tp, ", cp ", l.cp, ", pp ", l.pp, "): launch a multiple of ", model_ranks,
                            " ranks or change the layout"));
  l.dp = world / model_ranks;
  if (m.heads() % l.tp != 0 || m.kv_heads() % l.tp != 0)
    return bad(absl::StrCat("parallel.tp = ", l.tp, " does not divide model.heads = ", m.heads(),
                            " and model.kv_heads = ", m.kv_heads()));
  if (m.layers() % (l.pp * l.vpp) != 0)
    return bad(absl::StrCat("parallel.pp·vpp = ", l.pp, "·", l.vpp, " = ", l.pp * l.vpp,
                            " does not divide model.layers = ", m.layers()));
  if (l.pp > 1 && m.tie_embeddings())
    return bad(absl::StrCat("model.tie_embeddings with parallel.pp = ", l.pp,
                            " is not supported yet: untie the embeddings or use pp = 1"));
  if (l.vpp > 1 && l.pp < 2) return bad(absl::StrCat("parallel.vpp = ", l.vpp, " needs parallel.pp >= 2"));
  if (l.dp % l.ep != 0)
    return bad(absl::StrCat("parallel.ep = ", l.ep, " does not divide the data-parallel size dp = ", l.dp,
                            " (world ", world, " / tp·cp·pp ", model_ranks, ")"));
  if (t.global_batch() % (l.dp * t.micro_batch()) != 0)
    return bad(absl::StrCat("train.global_batch = ", t.global_batch(), " is not a multiple of dp·micro_batch = ",
                            l.dp, "·", t.micro_batch(), " = ", l.dp * t.micro_batch()));
  if (l.cp > 1 && t.seq_len() % (2 * l.cp) != 0)
    return bad(absl::StrCat("train.seq_len = ", t.seq_len(), " is not divisible by 2·cp = ", 2 * l.cp,
                            " (zig-zag chunks): use a multiple of ", 2 * l.cp));
  if (l.cp > 1) {
    LOOM_ASSIGN_OR_RETURN(const CpSoftmaxScheme scheme, ParseCpSoftmaxScheme(p.cp_softmax()));
    absl::Status s = CheckCpAttention(scheme, l.cp, m.heads() / l.tp, m.kv_heads() / l.tp);
    if (!s.ok()) return bad(std::string(s.message()));
  }
  if (p.sequence_parallel() && l.tp > 1 && (t.seq_len() / l.cp) % l.tp != 0)
    return bad(absl::StrCat("parallel.sequence_parallel: train.seq_len / cp = ", t.seq_len() / l.cp,
                            " tokens per rank and sequence do not split over tp = ", l.tp));
  if (p.zero() != 0 && p.zero() != 1) return bad(absl::StrCat("parallel.zero = ", p.zero(), " is not 0 or 1"));
  return l;
}

}  // namespace loom
