#include "runtime/config.h"

#include <gtest/gtest.h>

#include <fstream>

#include "runtime/text_proto.h"

namespace loom {
namespace {

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}

TEST(Config, DefaultConfigFileLoads) {
  auto c = LoadConfig(LOOM_SOURCE_DIR "/configs/default.textproto", {});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model().pattern(), "SLLS");
}

TEST(Config, SetOverridesFileValues) {
  const std::string path = WriteTemp("a.textproto", "model { hidden: 64 heads: 4 }");
  auto c = LoadConfig(path, {"model.hidden=32", "optim.lr=0.5", "model.tie_embeddings=true", "train.run_dir=x"});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model().hidden(), 32);
  EXPECT_FLOAT_EQ(c->optim().lr(), 0.5f);
  EXPECT_TRUE(c->model().tie_embeddings());
  EXPECT_EQ(c->train().run_dir(), "x");
}

TEST(Config, ResolvedConfigHasEveryDefault) {
  auto c = LoadConfig("", {});
  ASSERT_TRUE(c.ok()) << c.status();
  const std::string text = ConfigToText(*c);
  EXPECT_NE(text.find("lightning_block: 64"), std::string::npos) << text;
  EXPECT_NE(text.find("warmup_steps: 20"), std::string::npos) << text;
}

TEST(Config, ExtractConfigArgsRemovesConfigAndSet) {
  const char* raw[] = {"prog", "--config", "f.textproto", "--set", "a.b=1", "--other", "--set=c.d=2", nullptr};
  char* argv[8];
  for (int i = 0; i < 8; ++i) argv[i] = const_cast<char*>(raw[i]);
  int argc = 7;
  auto args = ExtractConfigArgs(argc, argv);
  ASSERT_TRUE(args.ok());
  EXPECT_EQ(args->config_path, "f.textproto");
  EXPECT_EQ(args->sets, (std::vector<std::string>{"a.b=1", "c.d=2"}));
  ASSERT_EQ(argc, 2);
  EXPECT_STREQ(argv[1], "--other");
}

// Each bad input is refused with a message that names the field or file.
struct BadCase {
  std::string file_text;
  std::vector<std::string> sets;
  std::string expected;  // substring of the message
};

TEST(Config, BadInputNamesTheFieldAndReason) {
  const std::vector<BadCase> cases = {
      {"model { hiden: 3 }", {}, "no field named \"hiden\". (did you mean 'hidden'?)"},
      {"model { hidden: \"big\" }", {}, "bad.textproto:1:17: Expected integer"},
      {"model { hidden: 100 heads: 3 }", {}, "model.heads: 3 does not divide model.hidden = 100"},
      {"model { heads: 4 kv_heads: 3 }", {}, "model.kv_heads: 3 does not divide model.heads = 4"},
      {"model { pattern: \"LLX\" }", {}, "model.pattern: 'X' is not a layer kind"},
      {"optim { lr: -1 }", {}, "optim.lr"},
      {"", {"model.hidden=abc"}, "--set model.hidden: 'abc' is not an int32"},
      {"", {"model.nope=1"}, "ModelConfig has no field 'nope'"},
      {"", {"model.hiden=64"}, "ModelConfig has no field 'hiden' (did you mean 'hidden'?)"},
      {"", {"train.step=5"}, "TrainConfig has no field 'step' (did you mean 'steps'?)"},
      {"", {"train.steps=0"}, "train.steps: 0 is below 1"},
      {"", {"model.lightning_norm_eps=0.5"}, "model.lightning_norm_eps: 0.5 is outside (0, 1e-2]"},
      {"", {"model.layers"}, "expected path.to.field=value"},
      {"", {"train.global_batch=10", "train.micro_batch=4"}, "train.global_batch: 10 is not a positive multiple"},
  };
  for (const BadCase& bad : cases) {
    const std::string path = WriteTemp("bad.textproto", bad.file_text);
    auto c = LoadConfig(path, bad.sets);
    ASSERT_FALSE(c.ok()) << bad.file_text;
    EXPECT_NE(std::string(c.status().message()).find(bad.expected), std::string::npos)
        << "message: " << c.status().message() << "\nexpected to contain: " << bad.expected;
    EXPECT_EQ(std::string(c.status().message()).find('\n'), std::string::npos) << "one line";
  }
}

TEST(Config, FieldHintsOnlyForNearNames) {
  const auto& model = *config::ModelConfig::descriptor();
  EXPECT_EQ(NearestFieldHint(model, "layer"), " (did you mean 'layers'?)");
  EXPECT_EQ(NearestFieldHint(model, "nope"), "");
  EXPECT_EQ(NearestFieldHint(model, "x"), "");  // one letter is near everything short: no hint
}

TEST(Config, MissingFileIsNamed) {
  auto c = LoadConfig("/nonexistent/x.textproto", {});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find("/nonexistent/x.textproto"), std::string::npos);
}

TEST(Config, ParseErrorsCarryFileLineAndColumn) {
  const std::string path = WriteTemp("syntax.textproto", "model {\n  hidden: 8\n  oops: 1\n}\n");
  auto c = LoadConfig(path, {});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(std::string(c.status().message()).find(path + ":3:"), std::string::npos) << c.status().message();
}

}  // namespace
}  // namespace loom
