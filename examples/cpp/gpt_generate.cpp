// Loads a GPT checkpoint directory (config.json + model.safetensors, written
// by Python or C++), runs a forward pass over a prompt and greedy generation:
//
//   gpt_generate MODEL_DIR --ids 5,17,3 [--max-new-tokens 20] [--logits-out FILE]
//
// Prints the generated token ids; --logits-out writes the prompt's logits as
// a safetensors file (tensor "logits") for comparison with other programs.
#include <attnzoo/attnzoo.h>

#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) ids.push_back(std::stoll(item));
  return ids;
}

int usage() {
  std::cerr << "usage: gpt_generate MODEL_DIR --ids 1,2,3 [--max-new-tokens N] [--logits-out FILE]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string dir = argv[1], logits_out;
  std::vector<int64_t> prompt;
  int64_t max_new_tokens = 20;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--ids")
      prompt = parse_ids(value);
    else if (flag == "--max-new-tokens")
      max_new_tokens = std::stoll(value);
    else if (flag == "--logits-out")
      logits_out = value;
    else
      return usage();
  }
  if (prompt.empty()) return usage();
  try {
    auto gpt = attnzoo::from_pretrained_as<attnzoo::models::GPTImpl>(dir);  // in eval mode
    torch::NoGradGuard no_grad;
    auto ids = torch::tensor(prompt, torch::kLong).unsqueeze(0);
    auto logits = gpt->forward(ids);
    if (!logits_out.empty()) attnzoo::io::save_safetensors(logits_out, {{"logits", logits}});
    attnzoo::models::GenerationOptions options;
    options.max_new_tokens = max_new_tokens;
    auto out = gpt->generate(ids, options);
    std::cout << "tokens:";
    for (int64_t t = 0; t < out.size(1); ++t) std::cout << ' ' << out[0][t].item<int64_t>();
    std::cout << '\n';
  } catch (const std::exception& e) {
    std::cerr << "gpt_generate: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
