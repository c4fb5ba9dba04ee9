// The byte-level BPE tokenizer on a tiny vocabulary.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "tokenizer.hpp"

using namespace llm;

namespace {
// GPT-2 byte alphabet: ' ' is U+0120 "Ġ", '\n' is U+010A "Ċ".
const std::string G = "\xC4\xA0", C = "\xC4\x8A";

Tokenizer tiny() {
  std::vector<std::string> vocab{"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  for (const char* s : {"h", "e", "l", "o", "w", "r", "d", "1", "2", "'", "s", "!", "a", "t", "i"})
    vocab.push_back(s);
  for (const std::string& s :
       {G, C, std::string("he"), std::string("ll"), std::string("hell"), std::string("hello"),
        G + "w", G + "wo", std::string("or"), std::string("12"), std::string("'s"), G + G,
        std::string("it"), G + "a", G + "it"})
    vocab.push_back(s);
  const std::vector<std::string> merges{"h e",     "l l",    "he ll",  "hell o", G + " w",
                                        G + "w o", "o r",    "1 2",    "' s",    G + " " + G,
                                        "i t",     G + " a", G + " it"};
  std::vector<int> types(vocab.size(), 1);
  types[0] = types[1] = types[2] = 3;
  return Tokenizer(vocab, merges, types);
}

std::vector<std::string> pieces(const Tokenizer& t, const std::string& s) {
  std::vector<std::string> out;
  for (int id : t.encode(s)) out.push_back(t.token(id));
  return out;
}
}  // namespace

TEST_CASE("pre-tokenisation: words with their leading space, single digits, contractions, spaces") {
  using V = std::vector<std::string>;
  CHECK(pretokenize("hello world") == V{"hello", " world"});
  CHECK(pretokenize("it's 12!") == V{"it", "'s", " ", "1", "2", "!"});
  CHECK(pretokenize("a  b") == V{"a", " ", " b"});
  CHECK(pretokenize("x \n\ny") == V{"x", " \n", "\n", "y"});  // \s+(?!\S) then \s+
  CHECK(pretokenize("end  ") == V{"end", "  "});
  CHECK(pretokenize("is  7") == V{"is", "  ", "7"});
  CHECK(pretokenize("(a)") == V{"(", "a", ")"});
  CHECK(pretokenize(" ...") == V{" ..."});
  CHECK(pretokenize("we'RE") == V{"we", "'", "RE"});  // contractions are lower case only
  CHECK(pretokenize("caf\xC3\xA9 ok") == V{"caf\xC3\xA9", " ok"});
  CHECK(pretokenize("").empty());
}

TEST_CASE("BPE merges by rank, digits stay single, specials are matched literally") {
  const Tokenizer t = tiny();
  using V = std::vector<std::string>;
  CHECK(pieces(t, "hello world") == V{"hello", G + "wo", "r", "l", "d"});
  CHECK(pieces(t, "hell") == V{"hell"});
  CHECK(pieces(t, "12") == V{"1", "2"});  // the "12" merge is never reached
  CHECK(pieces(t, "it's") == V{"it", "'s"});
  CHECK(pieces(t, "<|im_start|>hello<|im_end|>\n") == V{"<|im_start|>", "hello", "<|im_end|>", C});
  CHECK(t.encode("<|im_start|>", false).size() > 1);  // specials off: plain text
  CHECK(pieces(t, " it a") == V{G + "it", G + "a"});
  CHECK(pieces(t, "  a") == V{G, G + "a"});
  CHECK(t.encode("hello") == std::vector<int>{t.id("hello")});
  CHECK(t.id("missing") == -1);
}

TEST_CASE("decoding maps the byte alphabet back") {
  const Tokenizer t = tiny();
  for (const std::string s : {"hello world", "it's 12!", "<|im_start|>hello\n", "  a"})
    CHECK(t.decode(t.encode(s)) == s);
  CHECK(t.decode_token(t.id(G + "wo")) == " wo");
  CHECK(t.decode_token(t.id(C)) == "\n");
}
