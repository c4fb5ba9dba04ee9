// Minimal JSON reader (objects, arrays, numbers, strings, true/false/null) for
// the golden cases' meta.json; and nothing more.
#pragma once

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace cake_tools {

struct Json {
  enum class Kind { null, boolean, number, string, array, object } kind = Kind::null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;

  const Json& operator[](const std::string& k) const {
    auto it = obj.find(k);
    if (kind != Kind::object || it == obj.end())
      throw std::runtime_error("json: missing key '" + k + "'");
    return it->second;
  }
  const Json& operator[](std::size_t i) const {
    if (kind != Kind::array || i >= arr.size())
      throw std::runtime_error("json: index out of range");
    return arr[i];
  }
  bool has(const std::string& k) const { return kind == Kind::object && obj.count(k) != 0; }
  std::size_t size() const { return kind == Kind::array ? arr.size() : obj.size(); }
  // An integer field: a whole number within +-2^53 (exact in a double), else an
  // error; casting an out-of-range double to an integer is undefined behaviour.
  long long as_int() const {
    if (!(num >= -9007199254740992.0 && num <= 9007199254740992.0) ||
        num != static_cast<double>(static_cast<long long>(num)))
      throw std::runtime_error("json: expected an integer within +-2^53, got " +
                               std::to_string(num));
    return static_cast<long long>(num);
  }
  double as_double() const { return num; }
  bool as_bool() const { return kind == Kind::boolean ? b : num != 0; }

  static Json parse(const std::string& text) {
    std::size_t i = 0;
    Json j = parse_value(text, i, 0);
    skip(text, i);
    if (i != text.size()) throw std::runtime_error("json: trailing characters");
    return j;
  }

 private:
  static void skip(const std::string& s, std::size_t& i) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) ++i;
  }
  // s[i], or '\0' past the end: a truncated document then fails the next check
  // instead of reading out of bounds.
  static char peek(const std::string& s, std::size_t i) { return i < s.size() ? s[i] : '\0'; }
  static std::string parse_string(const std::string& s, std::size_t& i) {
    if (peek(s, i) != '"') throw std::runtime_error("json: expected a string");
    std::string out;
    ++i;  // opening quote
    while (i < s.size() && s[i] != '"') {
      if (s[i] == '\\' && i + 1 < s.size()) {
        ++i;
        switch (s[i]) {
          case 'n':
            out += '\n';
            break;
          case 't':
            out += '\t';
            break;
          case 'u':
            if (s.size() - i < 5) throw std::runtime_error("json: truncated \\u escape");
            out += '?';
            i += 4;
            break;
          default:
            out += s[i];
        }
      } else {
        out += s[i];
      }
      ++i;
    }
    if (i >= s.size()) throw std::runtime_error("json: unterminated string");
    ++i;
    return out;
  }
  static Json parse_value(const std::string& s, std::size_t& i, int depth) {
    skip(s, i);
    if (i >= s.size()) throw std::runtime_error("json: unexpected end");
    // Bounded recursion: a deeply nested document must not overflow the stack.
    if (depth > 256) throw std::runtime_error("json: nested too deeply");
    Json j;
    const char c = s[i];
    if (c == '{') {
      j.kind = Kind::object;
      ++i;
      skip(s, i);
      if (peek(s, i) == '}') {
        ++i;
        return j;
      }
      while (true) {
        skip(s, i);
        std::string key = parse_string(s, i);
        skip(s, i);
        if (peek(s, i) != ':') throw std::runtime_error("json: expected ':'");
        ++i;
        j.obj[key] = parse_value(s, i, depth + 1);
        skip(s, i);
        if (peek(s, i) == ',') {
          ++i;
          continue;
        }
        if (peek(s, i) == '}') {
          ++i;
          break;
        }
        throw std::runtime_error("json: expected ',' or '}'");
      }
    } else if (c == '[') {
      j.kind = Kind::array;
      ++i;
      skip(s, i);
      if (peek(s, i) == ']') {
        ++i;
        return j;
      }
      while (true) {
        j.arr.push_back(parse_value(s, i, depth + 1));
        skip(s, i);
        if (peek(s, i) == ',') {
          ++i;
          continue;
        }
        if (peek(s, i) == ']') {
          ++i;
          break;
        }
        throw std::runtime_error("json: expected ',' or ']'");
      }
    } else if (c == '"') {
      j.kind = Kind::string;
      j.str = parse_string(s, i);
    } else if (s.compare(i, 4, "true") == 0) {
      j.kind = Kind::boolean;
      j.b = true;
      i += 4;
    } else if (s.compare(i, 5, "false") == 0) {
      j.kind = Kind::boolean;
      i += 5;
    } else if (s.compare(i, 4, "null") == 0) {
      i += 4;
    } else {
      std::size_t end = 0;
      j.kind = Kind::number;
      j.num = std::stod(s.substr(i, 64), &end);
      i += end;
    }
    return j;
  }
};

}  // namespace cake_tools
