// The README's C++ quick start: load the committed char-level GPT, print the
// next-byte logits of the vowels after "And God" and a greedy continuation.
// Run from the repository root: ./build-examples/quickstart
#include <attnzoo/attnzoo.h>

#include <iostream>
#include <string>

int main() {
  auto gpt = attnzoo::from_pretrained_as<attnzoo::models::GPTImpl>("models/gpt-kjv/checkpoint");  // eval mode
  torch::NoGradGuard no_grad;
  auto ids = torch::tensor({65, 110, 100, 32, 71, 111, 100}).unsqueeze(0);  // the bytes of "And God"
  auto logits = gpt->forward(ids)[0][-1];  // next-byte logits after "And God"
  for (char c : std::string("aeiou")) std::cout << c << ' ' << logits[c].item<float>() << '\n';
  attnzoo::models::GenerationOptions options;
  options.max_new_tokens = 40;
  auto out = gpt->generate(ids, options);  // greedy, with a KV cache
  for (int64_t i = 0; i < out.size(1); ++i) std::cout << char(out[0][i].item<int64_t>());
  std::cout << '\n';
}
