// The evaluation's journal: what is read back is bit for bit what was written, a
// line cut short by a stop is dropped (its prompt runs again), and a journal of
// other settings or a malformed line is refused with what was expected.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>

#include "journal.hpp"

namespace {

std::string temp_journal(const char* name) {
  const auto p = std::filesystem::temp_directory_path() / (std::string("cake_llm_journal_") + name);
  std::filesystem::remove(p);
  return p.string();
}

llm::PromptRecord sample(int trial) {
  llm::PromptRecord r;
  r.context = 8192;
  r.trial = trial;
  r.tokens = 8170 + trial;
  r.depth = 0.1 * trial;  // not a short decimal: only an exact format keeps it
  r.filler = trial % 4;
  r.seconds = 71.123456789;
  r.full_found = trial % 2 == 0;
  r.key = std::to_string(10000 + 7 * trial);
  r.full_answer = " The pass key is 1: 2 3\nnext\r line: 100%" + r.key;  // spaces, breaks, : and %
  r.found = {1, 0, trial};
  r.agree = {20, 7, 0};
  r.cache_tokens = {128, 512, 164};
  r.held = {{1.0 / 3, 0.0, 2.0 / 3}, {1e-310, -0.0, 1}, {0.5, 0.25, 0.125}};  // a denormal
  r.decisions = {{{2.5, 1e-7, 0.3333333333333333, 17}, {3.75, 0.001, 1.0 / 7, 94}},
                 {},
                 {{std::nextafter(1.0, 2.0), 0, 0, -1}, {0, 0, 0, 0}}};
  return r;
}

void check_same(const llm::PromptRecord& a, const llm::PromptRecord& b) {
  CHECK(a.context == b.context);
  CHECK(a.trial == b.trial);
  CHECK(a.tokens == b.tokens);
  CHECK(std::memcmp(&a.depth, &b.depth, sizeof(double)) == 0);
  CHECK(a.filler == b.filler);
  CHECK(std::memcmp(&a.seconds, &b.seconds, sizeof(double)) == 0);
  CHECK(a.full_found == b.full_found);
  CHECK(a.key == b.key);
  CHECK(a.full_answer == b.full_answer);
  CHECK(a.found == b.found);
  CHECK(a.agree == b.agree);
  CHECK(a.cache_tokens == b.cache_tokens);
  REQUIRE(a.held.size() == b.held.size());
  for (std::size_t c = 0; c < a.held.size(); ++c) {
    REQUIRE(a.held[c].size() == b.held[c].size());
    for (std::size_t l = 0; l < a.held[c].size(); ++l)
      CHECK(std::memcmp(&a.held[c][l], &b.held[c][l], sizeof(double)) == 0);  // -0 stays -0
  }
  REQUIRE(a.decisions.size() == b.decisions.size());
  for (std::size_t c = 0; c < a.decisions.size(); ++c) {
    REQUIRE(a.decisions[c].size() == b.decisions[c].size());
    for (std::size_t l = 0; l < a.decisions[c].size(); ++l) {
      const auto &x = a.decisions[c][l], &y = b.decisions[c][l];
      CHECK(std::memcmp(&x.entropy, &y.entropy, sizeof(double)) == 0);
      CHECK(std::memcmp(&x.variance, &y.variance, sizeof(double)) == 0);
      CHECK(std::memcmp(&x.preference, &y.preference, sizeof(double)) == 0);
      CHECK(x.budget == y.budget);
    }
  }
}

}  // namespace

TEST_CASE("journal: the program's identity is a hash of its file") {
  const std::string id = llm::executable_id();
  CHECK(id.size() == 16);
  CHECK(id == llm::executable_id());  // the same file, the same hash
}

TEST_CASE("journal: a prompt's record reads back bit for bit") {
  for (int trial : {0, 1, 3}) {
    const llm::PromptRecord r = sample(trial);
    const std::string line = llm::to_line(r);
    CHECK(line.find('\n') == std::string::npos);  // one record, one line
    check_same(llm::parse_line(line), r);
  }
  llm::PromptRecord empty;  // no configurations, key not located
  check_same(llm::parse_line(llm::to_line(empty)), empty);
}

TEST_CASE("journal: malformed lines are refused with the field expected") {
  const std::string line = llm::to_line(sample(1));
  const auto message = [](const std::string& l) {
    try {
      llm::parse_line(l);
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  CHECK(message(line.substr(0, line.size() / 2)).find("expected") != std::string::npos);
  CHECK(message("prompt 8192 x") == message("prompt 8192 x"));
  CHECK(message("prompt 8192 x").find("trial (an integer in") != std::string::npos);
  CHECK(message("record 1").find("'prompt'") != std::string::npos);
  CHECK(message(line + " 5").find("the end of the line") != std::string::npos);
  // A string whose length runs past the line.
  const std::string long_key = "prompt 1 2 3 0x0p+0 0 0x0p+0 1 99:12345";
  CHECK(message(long_key).find("key (a string: its length") != std::string::npos);
  CHECK(message("prompt 1 2 3 0x0p+0 0 0x0p+0 1 5:12%4x").find("key (a string; '%'") !=
        std::string::npos);
  // Lengths that are not plain digits or run past the line, escapes that are not two
  // hex digits, integers out of their field's range.
  CHECK(message("prompt 1 2 3 0x0p+0 0 0x0p+0 1 -2:ab 0 0 0 0 0").find("key (a string") !=
        std::string::npos);
  CHECK(message("prompt 1 2 3 0x0p+0 0 0x0p+0 1 +2:ab").find("key (a string") != std::string::npos);
  CHECK(message("prompt 1 2 3 0x0p+0 0 0x0p+0 1 3:%+A").find("'%' then two hex digits") !=
        std::string::npos);
  CHECK(message("prompt 1 2 3 0x0p+0 0 0x0p+0 1 3:% A").find("'%' then two hex digits") !=
        std::string::npos);
  CHECK(message("prompt 4294975488 2").find("context (an integer in") != std::string::npos);
  CHECK(message("prompt 99999999999999999999 2").find("context (an integer in") !=
        std::string::npos);
  CHECK(message("prompt +1 2").find("context (an integer in") != std::string::npos);
  CHECK(message("prompt 1 2 3 0x0p+0 0 0x0p+0 2 1:a").find("full_found (an integer in [0, 1])") !=
        std::string::npos);
  CHECK(message("prompt 1 2 3 0x0p+0 0 0x0p+0 1 5:12345 0: -4")
            .find("configs (an integer in [0, 1048576])") != std::string::npos);
}

TEST_CASE("journal: resumes what it holds, drops a cut last line, refuses other settings") {
  const std::string path = temp_journal("resume.txt");
  {
    llm::Journal j(path, "contexts=8192, trials=110");
    CHECK(j.size() == 0);
    CHECK(j.find(8192, 0) == nullptr);
    j.append(sample(0));
    j.append(sample(1));
  }
  {
    llm::Journal j(path, "contexts=8192, trials=110");
    CHECK(j.size() == 2);
    CHECK_FALSE(j.dropped_a_cut_line());
    REQUIRE(j.find(8192, 1) != nullptr);
    check_same(*j.find(8192, 1), sample(1));
    CHECK(j.find(8192, 2) == nullptr);
    CHECK(j.find(4096, 1) == nullptr);
    j.append(sample(2));
  }
  // The stop came in the middle of writing trial 3.
  {
    const std::string cut = llm::to_line(sample(3));
    std::ofstream(path, std::ios::app) << cut.substr(0, cut.size() / 3);
  }
  {
    llm::Journal j(path, "contexts=8192, trials=110");
    CHECK(j.size() == 3);
    CHECK(j.dropped_a_cut_line());
    CHECK(j.find(8192, 3) == nullptr);
    j.append(sample(3));  // after the dropped piece: a whole line of its own
  }
  {  // the file: the header and four whole records, nothing of the cut piece
    std::ifstream f(path, std::ios::binary);
    const std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::string want = llm::journal_header("contexts=8192, trials=110") + "\n";
    for (int t = 0; t < 4; ++t) want += llm::to_line(sample(t)) + "\n";
    CHECK(all == want);
  }
  {
    llm::Journal j(path, "contexts=8192, trials=110");
    CHECK(j.size() == 4);
    CHECK_FALSE(j.dropped_a_cut_line());
    REQUIRE(j.find(8192, 3) != nullptr);
    check_same(*j.find(8192, 3), sample(3));
  }
  CHECK_THROWS_WITH_AS(llm::Journal(path, "contexts=8192, trials=100"),
                       doctest::Contains("other settings"), std::runtime_error);
  // A prompt recorded twice is refused, naming the file and the line.
  {
    std::ofstream f(path, std::ios::trunc);
    f << llm::journal_header("s") << "\n"
      << llm::to_line(sample(0)) << "\n"
      << llm::to_line(sample(1)) << "\n"
      << llm::to_line(sample(0)) << "\n";
  }
  CHECK_THROWS_WITH_AS(llm::Journal(path, "s"), doctest::Contains("line 4: context 8192, trial 0"),
                       std::runtime_error);
  // A malformed record that is not the last line is an error, not a silent drop.
  {
    std::ofstream f(path, std::ios::trunc);
    f << llm::journal_header("s") << "\nprompt 1 2\n" << llm::to_line(sample(0)) << "\n";
  }
  CHECK_THROWS_WITH_AS(llm::Journal(path, "s"),
                       doctest::Contains(", line 2: journal line: expected"), std::runtime_error);
  std::filesystem::remove(path);
}
