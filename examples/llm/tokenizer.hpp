// Byte-level BPE (GPT-2 style) from a GGUF vocabulary and merge list.
//
//  1. Special (control) tokens such as <|im_start|> are matched literally first.
//  2. Pre-tokenisation as SmolLM's tokenizer.json: every digit on its own, then the
//     GPT-2 pattern 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//  3. Each piece's UTF-8 bytes are mapped to GPT-2's printable byte alphabet and
//     merged by rank.
// Unicode classes are approximated: ASCII exactly; code points >= 0x80 count as
// letters unless they are Unicode spaces or general punctuation. That is exact for
// English text and close elsewhere.
#pragma once

#include <array>
#include <climits>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace llm {

inline void append_utf8(std::string& s, std::uint32_t cp) {
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    s.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    s.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Decodes one code point at s[i], advancing i; invalid bytes decode as themselves.
inline std::uint32_t next_utf8(const std::string& s, std::size_t& i) {
  const auto c = static_cast<unsigned char>(s[i]);
  int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (i + static_cast<std::size_t>(len) > s.size()) len = 1;
  std::uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
  for (int k = 1; k < len; ++k) {
    const auto cc = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
    if ((cc & 0xC0) != 0x80) {
      len = 1;
      cp = c;
      break;
    }
    cp = (cp << 6) | (cc & 0x3Fu);
  }
  i += static_cast<std::size_t>(len);
  return cp;
}

namespace unicode {
inline bool is_space(std::uint32_t c) {
  return c == ' ' || (c >= 9 && c <= 13) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}
inline bool is_digit(std::uint32_t c) { return c >= '0' && c <= '9'; }
inline bool is_letter(std::uint32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  if (is_space(c)) return false;
  if (c < 0xC0) return c == 0xAA || c == 0xB5 || c == 0xBA;  // Latin-1 punctuation and symbols
  if (c == 0xD7 || c == 0xF7) return false;
  if (c >= 0x2000 && c <= 0x2BFF) return false;  // punctuation, symbols, arrows, math
  if (c >= 0x3000 && c <= 0x303F) return false;  // CJK punctuation
  if (c >= 0xFF00 && c <= 0xFF0F) return false;
  if (c >= 0x1F000 && c <= 0x1FAFF) return false;  // emoji
  return true;
}
}  // namespace unicode

// Splits text into pre-tokens (no special tokens inside).
inline std::vector<std::string> pretokenize(const std::string& text) {
  // Code points with their byte ranges.
  std::vector<std::uint32_t> cps;
  std::vector<std::size_t> at;
  for (std::size_t i = 0; i < text.size();) {
    at.push_back(i);
    cps.push_back(next_utf8(text, i));
  }
  at.push_back(text.size());
  const std::size_t n = cps.size();
  std::vector<std::string> out;
  auto emit = [&](std::size_t a, std::size_t b) {
    out.push_back(text.substr(at[a], at[b] - at[a]));
  };
  using namespace unicode;
  std::size_t i = 0;
  while (i < n) {
    const std::uint32_t c = cps[i];
    // Digits are split one by one before anything else (pre-tokenizer "Digits").
    if (is_digit(c)) {
      emit(i, i + 1);
      ++i;
      continue;
    }
    // Contractions: 's 't 're 've 'm 'll 'd (lower case, as in GPT-2's pattern).
    if (c == '\'' && i + 1 < n) {
      const std::uint32_t a = cps[i + 1], b = i + 2 < n ? cps[i + 2] : 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        emit(i, i + 3);
        i += 3;
        continue;
      }
    }
    const std::size_t j = (c == ' ' && i + 1 < n) ? i + 1 : i;  // optional leading space
    const std::uint32_t cj = cps[j];
    if (is_letter(cj)) {
      std::size_t k = j + 1;
      while (k < n && is_letter(cps[k])) ++k;
      emit(i, k);
      i = k;
      continue;
    }
    if (is_digit(cj) && j != i) {
      // " 7": the digit pre-tokenizer already isolated digits, so the space stands alone.
      emit(i, i + 1);
      ++i;
      continue;
    }
    if (!is_space(cj) && !is_letter(cj) && !is_digit(cj)) {
      std::size_t k = j + 1;
      while (k < n && !is_space(cps[k]) && !is_letter(cps[k]) && !is_digit(cps[k])) ++k;
      emit(i, k);
      i = k;
      continue;
    }
    // Whitespace run: \s+(?!\S) leaves the last space for the next word; else \s+.
    // A digit ends the piece (the Digits split happens first), so the run stays whole.
    std::size_t k = i;
    while (k < n && is_space(cps[k])) ++k;
    if (k < n && k - i >= 2 && !is_digit(cps[k])) {
      emit(i, k - 1);
      i = k - 1;
    } else {
      emit(i, k);
      i = k;
    }
  }
  return out;
}

class Tokenizer {
 public:
  Tokenizer() = default;
  // tokens: the vocabulary; merges: "a b" pairs by rank; types: GGUF token types
  // (3 = control, 4 = user-defined; both matched literally in text).
  Tokenizer(std::vector<std::string> tokens, const std::vector<std::string>& merges,
            const std::vector<int>& types = {})
      : tokens_(std::move(tokens)) {
    for (std::size_t i = 0; i < tokens_.size(); ++i) ids_.emplace(tokens_[i], static_cast<int>(i));
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const auto sp = merges[r].find(' ', 1);
      if (sp == std::string::npos)
        throw std::runtime_error("tokenizer: bad merge '" + merges[r] + "'");
      ranks_.emplace(merges[r].substr(0, sp) + '\x01' + merges[r].substr(sp + 1),
                     static_cast<int>(r));
    }
    for (std::size_t i = 0; i < types.size() && i < tokens_.size(); ++i)
      if (types[i] == 3 || types[i] == 4) specials_.emplace_back(tokens_[i], static_cast<int>(i));
    // GPT-2's byte alphabet: printable bytes map to themselves, the rest to U+0100...
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const std::uint32_t cp =
          printable ? static_cast<std::uint32_t>(b) : static_cast<std::uint32_t>(256 + extra++);
      std::string u;
      append_utf8(u, cp);
      byte_to_unicode_[static_cast<std::size_t>(b)] = u;
      unicode_to_byte_[cp] = static_cast<std::uint8_t>(b);
    }
  }

  std::size_t vocab_size() const { return tokens_.size(); }
  const std::string& token(int id) const { return tokens_.at(static_cast<std::size_t>(id)); }
  int id(const std::string& tok) const {
    auto it = ids_.find(tok);
    return it == ids_.end() ? -1 : it->second;
  }

  std::vector<int> encode(const std::string& text, bool parse_special = true) const {
    std::vector<int> out;
    std::size_t i = 0, start = 0;
    while (parse_special && i < text.size()) {
      int best = -1;
      std::size_t best_len = 0;
      for (const auto& [s, id] : specials_)
        if (s.size() > best_len && text.compare(i, s.size(), s) == 0) {
          best = id;
          best_len = s.size();
        }
      if (best >= 0) {
        encode_plain(text.substr(start, i - start), out);
        out.push_back(best);
        i += best_len;
        start = i;
      } else {
        ++i;
      }
    }
    encode_plain(text.substr(start), out);
    return out;
  }

  // The bytes a token stands for (special tokens as their text).
  std::string decode_token(int id) const {
    const std::string& t = token(id);
    std::string out;
    for (std::size_t i = 0; i < t.size();) {
      const std::uint32_t cp = next_utf8(t, i);
      auto it = unicode_to_byte_.find(cp);
      if (it != unicode_to_byte_.end())
        out.push_back(static_cast<char>(it->second));
      else
        append_utf8(out, cp);
    }
    return out;
  }
  std::string decode(const std::vector<int>& ids) const {
    std::string s;
    for (int id : ids) s += decode_token(id);
    return s;
  }

 private:
  std::vector<std::string> tokens_;
  std::unordered_map<std::string, int> ids_;
  std::unordered_map<std::string, int> ranks_;
  std::vector<std::pair<std::string, int>> specials_;
  std::array<std::string, 256> byte_to_unicode_;
  std::map<std::uint32_t, std::uint8_t> unicode_to_byte_;

  void encode_plain(const std::string& text, std::vector<int>& out) const {
    if (text.empty()) return;
    for (const auto& piece : pretokenize(text)) bpe(piece, out);
  }

  void bpe(const std::string& piece, std::vector<int>& out) const {
    std::vector<std::string> sym;
    for (unsigned char b : piece) sym.push_back(byte_to_unicode_[b]);
    while (sym.size() > 1) {
      int best = INT_MAX;
      std::size_t at = 0;
      for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
        auto it = ranks_.find(sym[i] + '\x01' + sym[i + 1]);
        if (it != ranks_.end() && it->second < best) {
          best = it->second;
          at = i;
        }
      }
      if (best == INT_MAX) break;
      sym[at] += sym[at + 1];
      sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    }
    for (const auto& s : sym) {
      auto it = ids_.find(s);
      if (it != ids_.end()) {
        out.push_back(it->second);
      } else {  // unknown symbol: fall back to its single bytes, or skip if absent
        for (std::size_t i = 0; i < s.size();) {
          const std::size_t a = i;
          next_utf8(s, i);
          auto jt = ids_.find(s.substr(a, i - a));
          if (jt != ids_.end()) out.push_back(jt->second);
        }
      }
    }
  }
};

}  // namespace llm
