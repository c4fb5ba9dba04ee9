// The evaluation's journal: one line per finished prompt with everything the report
// takes from it, written as soon as the prompt is done. A long run (the 8K context
// takes hours on 2 cores) that stops, at a restart or a session's end, resumes from
// its journal: the prompts recorded there are read back instead of run again, and
// the report is the one an uninterrupted run would print.
//
// Format (text, one record per line, fields separated by one space):
//   line 1: "cake_llm_eval-journal 1 " + the run's settings (a string; a resumed run
//           must have the same, or its prompts would not be the same prompts)
//   then:   "prompt" context trial tokens depth filler seconds full_found key
//           full_answer found[] agree[] cache_tokens[] held[][] decisions[][]
// Strings are length-prefixed ("5:ab cd": spaces as they are; line breaks and '%' as
// "%0A", "%0D", "%25"),
// arrays count-prefixed, and reals hexadecimal ("%a"), so that what is read back is
// bit for bit what was written.
#pragma once

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "model.hpp"

namespace llm {

struct PromptRecord {
  int context = 0;  // the context asked for (the cells' key)
  int trial = 0;    // the prompt's index within its context
  int tokens = 0;   // the prompt's length
  double depth = 0;
  int filler = 0;
  double seconds = 0;  // wall time the prompt took
  bool full_found = false;
  std::string key, full_answer;
  // (configs): needle found (0/1), agreeing steps, cache size in tokens
  std::vector<int> found, agree, cache_tokens;
  // (configs, layers): share of the layer's KV-head rows holding a token of the key
  // after the prefill (empty when the key was not located in the prompt's text)
  std::vector<std::vector<double>> held;
  // (configs, layers): a CAKE-preference store's decisions (empty rows elsewhere)
  std::vector<std::vector<KvStore::LayerDecision>> decisions;
};

namespace journal_detail {

inline void put(std::ostringstream& o, long long v) { o << ' ' << v; }
inline void put(std::ostringstream& o, double v) {
  char b[40];
  std::snprintf(b, sizeof b, " %a", v);
  o << b;
}
// A string's line breaks and '%' as "%XX", so that a record stays one line.
inline void put(std::ostringstream& o, const std::string& s) {
  std::string e;
  for (const char c : s) {
    if (c == '%' || c == '\n' || c == '\r') {
      char b[4];
      std::snprintf(b, sizeof b, "%%%02X", static_cast<unsigned char>(c));
      e += b;
    } else {
      e += c;
    }
  }
  o << ' ' << e.size() << ':' << e;
}
template <class T>
void put(std::ostringstream& o, const std::vector<T>& v) {
  put(o, static_cast<long long>(v.size()));
  for (const auto& x : v) {
    if constexpr (std::is_same_v<T, KvStore::LayerDecision>) {
      put(o, x.entropy);
      put(o, x.variance);
      put(o, x.preference);
      put(o, static_cast<long long>(x.budget));
    } else if constexpr (std::is_integral_v<T>) {
      put(o, static_cast<long long>(x));
    } else {
      put(o, x);
    }
  }
}

// Reads the fields back in order; any mismatch throws with the field's name.
class Reader {
 public:
  explicit Reader(const std::string& line) : s_(line) {}
  void expect(const std::string& word) {
    if (token() != word) fail("'" + word + "'");
  }
  // A decimal integer in [lo, hi] (digits after an optional '-': no '+', no spaces).
  long long integer(const char* what, long long lo = std::numeric_limits<int>::min(),
                    long long hi = std::numeric_limits<int>::max()) {
    const std::string t = token();
    const bool digits = !t.empty() && std::isdigit(static_cast<unsigned char>(t.back())) &&
                        (std::isdigit(static_cast<unsigned char>(t[0])) || t[0] == '-');
    char* end = nullptr;
    errno = 0;
    const long long v = digits ? std::strtoll(t.c_str(), &end, 10) : 0;
    if (!digits || *end != '\0' || errno == ERANGE || v < lo || v > hi)
      fail(std::string(what) + " (an integer in [" + std::to_string(lo) + ", " +
           std::to_string(hi) + "])");
    return v;
  }
  double real(const char* what) {
    const std::string t = token();
    char* end = nullptr;
    const double v = t.empty() ? 0 : std::strtod(t.c_str(), &end);
    if (t.empty() || *end != '\0') fail(std::string(what) + " (a real)");
    return v;
  }
  std::string string(const char* what) {
    skip_space();
    const std::size_t colon = s_.find(':', at_);
    const std::string len = colon == std::string::npos ? "" : s_.substr(at_, colon - at_);
    bool digits = !len.empty() && len.size() <= 9;  // under 1e9 bytes: no overflow below
    for (const char c : len) digits = digits && std::isdigit(static_cast<unsigned char>(c));
    const std::size_t n = digits ? std::stoul(len) : 0;
    if (!digits || n > s_.size() - colon - 1)
      fail(std::string(what) + " (a string: its length, ':', then that many bytes)");
    at_ = colon + 1 + n;
    std::string out;
    for (std::size_t i = colon + 1; i < at_; ++i) {
      if (s_[i] != '%') {
        out += s_[i];
        continue;
      }
      const auto hex = [&](std::size_t k) {
        return k < at_ && std::isxdigit(static_cast<unsigned char>(s_[k]));
      };
      if (!hex(i + 1) || !hex(i + 2))
        fail(std::string(what) + " (a string; '%' then two hex digits)");
      out += static_cast<char>(std::stoi(s_.substr(i + 1, 2), nullptr, 16));
      i += 2;
    }
    return out;
  }
  std::size_t count(const char* what) {
    return static_cast<std::size_t>(integer(what, 0, 1 << 20));
  }
  void end() {
    skip_space();
    if (at_ != s_.size()) fail("the end of the line");
  }

 private:
  void skip_space() {
    while (at_ < s_.size() && s_[at_] == ' ') ++at_;
  }
  std::string token() {
    skip_space();
    const std::size_t b = at_;
    while (at_ < s_.size() && s_[at_] != ' ') ++at_;
    return s_.substr(b, at_ - b);
  }
  [[noreturn]] void fail(const std::string& expected) const {
    throw std::runtime_error("journal line: expected " + expected + " at byte " +
                             std::to_string(at_) + " of \"" + s_.substr(0, 80) + "\"");
  }
  const std::string& s_;
  std::size_t at_ = 0;
};

}  // namespace journal_detail

// The running program's identity, a hash (FNV-1a) of its file: a journal's records
// hold for the build that wrote them, so the settings name it. "unknown" where
// /proc/self/exe cannot be read.
inline std::string executable_id() {
  std::ifstream f("/proc/self/exe", std::ios::binary);
  if (!f) return "unknown";
  std::uint64_t h = 1469598103934665603ull;
  std::vector<char> buf(1 << 16);
  while (f.read(buf.data(), static_cast<std::streamsize>(buf.size())) || f.gcount() > 0)
    for (std::streamsize i = 0; i < f.gcount(); ++i) {
      h ^= static_cast<unsigned char>(buf[static_cast<std::size_t>(i)]);
      h *= 1099511628211ull;
    }
  char out[20];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

inline std::string journal_header(const std::string& settings) {
  std::ostringstream o;
  o << "cake_llm_eval-journal 1";
  journal_detail::put(o, settings);
  return o.str();
}

inline std::string to_line(const PromptRecord& r) {
  using journal_detail::put;
  std::ostringstream o;
  o << "prompt";
  put(o, static_cast<long long>(r.context));
  put(o, static_cast<long long>(r.trial));
  put(o, static_cast<long long>(r.tokens));
  put(o, r.depth);
  put(o, static_cast<long long>(r.filler));
  put(o, r.seconds);
  put(o, static_cast<long long>(r.full_found));
  put(o, r.key);
  put(o, r.full_answer);
  put(o, r.found);
  put(o, r.agree);
  put(o, r.cache_tokens);
  put(o, static_cast<long long>(r.held.size()));
  for (const auto& h : r.held) put(o, h);
  put(o, static_cast<long long>(r.decisions.size()));
  for (const auto& d : r.decisions) put(o, d);
  return o.str();
}

inline PromptRecord parse_line(const std::string& line) {
  journal_detail::Reader in(line);
  PromptRecord r;
  in.expect("prompt");
  r.context = static_cast<int>(in.integer("context"));
  r.trial = static_cast<int>(in.integer("trial"));
  r.tokens = static_cast<int>(in.integer("tokens"));
  r.depth = in.real("depth");
  r.filler = static_cast<int>(in.integer("filler"));
  r.seconds = in.real("seconds");
  r.full_found = in.integer("full_found", 0, 1) != 0;
  r.key = in.string("key");
  r.full_answer = in.string("full_answer");
  for (auto* v : {&r.found, &r.agree, &r.cache_tokens}) {
    v->resize(in.count("configs"));
    for (auto& x : *v) x = static_cast<int>(in.integer("a per-config count"));
  }
  r.held.resize(in.count("configs"));
  for (auto& h : r.held) {
    h.resize(in.count("layers"));
    for (auto& x : h) x = in.real("held share");
  }
  r.decisions.resize(in.count("configs"));
  for (auto& d : r.decisions) {
    d.resize(in.count("layers"));
    for (auto& x : d) {
      x.entropy = in.real("entropy");
      x.variance = in.real("variance");
      x.preference = in.real("preference");
      x.budget = in.integer("budget", std::numeric_limits<std::int64_t>::min(),
                            std::numeric_limits<std::int64_t>::max());
    }
  }
  in.end();
  return r;
}

// An open journal: the records already in it (by context and trial) and a stream
// that appends new ones. A new file gets the header; an existing one must carry the
// same settings.
class Journal {
 public:
  Journal(const std::string& path, const std::string& settings) : path_(path) {
    const std::string header = journal_header(settings);
    std::ifstream in(path);
    std::string line;
    if (in && std::getline(in, line)) {
      if (line != header)
        throw std::runtime_error("journal " + path +
                                 " was written by a run with other settings (its first line is \"" +
                                 line.substr(0, 200) + "\", this run's is \"" + header +
                                 "\"): give another --journal file");
      // A line cut short by the stop that ended the last run is dropped (its prompt
      // runs again): the file is cut back to its last line break, nothing else
      // rewritten. Anything else malformed is an error, as is a prompt recorded twice.
      std::vector<std::string> lines;
      while (std::getline(in, line)) lines.push_back(line);
      in.close();
      const auto size = std::filesystem::file_size(path);
      const bool ended = lines.empty() || last_byte_is_newline(path, size);
      for (std::size_t i = 0; i < lines.size(); ++i) {
        if (i + 1 == lines.size() && !ended) {
          cut_ = true;
          std::filesystem::resize_file(path, size - lines[i].size());
          break;
        }
        const std::string where = "journal " + path + ", line " + std::to_string(i + 2) + ": ";
        PromptRecord r;
        try {
          r = parse_line(lines[i]);
        } catch (const std::exception& e) {
          throw std::runtime_error(where + e.what());
        }
        const std::pair<int, int> k{r.context, r.trial};
        if (done_.count(k))
          throw std::runtime_error(where + "context " + std::to_string(r.context) + ", trial " +
                                   std::to_string(r.trial) + " recorded a second time");
        done_.emplace(k, std::move(r));
      }
      out_.open(path, std::ios::app);
    } else {
      out_.open(path, std::ios::trunc);
      out_ << header << '\n';
      out_.flush();
    }
    if (!out_) throw std::runtime_error("journal " + path + ": cannot write");
  }
  // The record of (context, trial) when the journal holds it, else null.
  const PromptRecord* find(int context, int trial) const {
    const auto it = done_.find({context, trial});
    return it == done_.end() ? nullptr : &it->second;
  }
  std::size_t size() const { return done_.size(); }
  const std::string& path() const { return path_; }
  bool dropped_a_cut_line() const { return cut_; }
  void append(const PromptRecord& r) {
    out_ << to_line(r) << '\n';
    out_.flush();  // on disk before the next prompt starts
    if (!out_) throw std::runtime_error("journal " + path_ + ": write failed");
  }

 private:
  static bool last_byte_is_newline(const std::string& path, std::uintmax_t size) {
    if (size == 0) return true;
    std::ifstream f(path, std::ios::binary);
    f.seekg(static_cast<std::streamoff>(size - 1));
    return f.get() == '\n';
  }
  std::string path_;
  std::map<std::pair<int, int>, PromptRecord> done_;
  std::ofstream out_;
  bool cut_ = false;
};

}  // namespace llm
